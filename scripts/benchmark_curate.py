"""Curation throughput: cases per minute for 4 mm and autoPET-sized studies, one worker against all, and the
projected time for a 5,731-scan cohort (PETS-5k).

Each grid gets an autoPET-layout source of positive phantoms (``SUV.nii.gz`` stored LPS as autoPET's are, so
every case is reoriented, plus ``SEG.nii.gz``), written once to ``--work``. Each worker count then curates the
source into a fresh datastore (``segany_pet.curate``, the code ``segany-pet curate`` runs) and the time per
case is read off the run, with the mean time of a case inside its worker.

    .venv/bin/python scripts/benchmark_curate.py [--cases-4mm 12] [--cases-autopet 4] [--workers 1 2]
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np

from segany_pet.curate import curate
from segany_pet.curate.sources import Source
from segany_pet.label.datastore import PETDatastore
from segany_pet.pet import save_nifti
from segany_pet.phantom import generate_case

REPO = Path(__file__).resolve().parents[1]
PETS_5K = 5731


def write_source(folder: Path, grid: str, cases: int) -> None:
    """``cases`` autoPET-style studies of ``grid``, kept when a previous run wrote the same ones."""
    stamp = folder / "source.json"
    recipe = {"grid": grid, "cases": cases}
    if stamp.exists() and json.loads(stamp.read_text()) == recipe:
        return
    shutil.rmtree(folder, ignore_errors=True)
    for index in range(cases):
        case = generate_case(100 + index, "fdg" if index % 2 == 0 else "psma", grid, negative=False)
        flip = np.eye(4)  # LPS storage: the first two axes reversed, same world positions
        for axis in (0, 1):
            flip[axis, axis], flip[axis, 3] = -1.0, case.suv.shape[axis] - 1
        study = folder / f"PETCT_{index:04d}" / "study"
        study.mkdir(parents=True)
        save_nifti(case.suv[::-1, ::-1].copy(), case.affine @ flip, study / "SUV.nii.gz")
        save_nifti((case.lesions[::-1, ::-1] > 0).astype(np.uint8), case.affine @ flip, study / "SEG.nii.gz")
    stamp.write_text(json.dumps(recipe))


def measure(source: Source, datastore_dir: Path, workers: int) -> dict:
    shutil.rmtree(datastore_dir, ignore_errors=True)
    datastore = PETDatastore(str(datastore_dir), extensions=("*.nii.gz",), auto_reload=False)
    started = time.perf_counter()
    run = curate([source], datastore, workers=workers)
    seconds = time.perf_counter() - started
    if run.problems or len(run.imported) != run.cases:
        raise SystemExit(f"benchmark cases were refused: {run.problems}")
    inside = [datastore.get_image_info(i)["curation"]["seconds"] for i in run.imported]
    return {"cases": run.cases, "seconds": seconds, "per_minute": 60.0 * run.cases / seconds,
            "worker_seconds_per_case": float(np.mean(inside))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases-4mm", type=int, default=12)
    parser.add_argument("--cases-autopet", type=int, default=4)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--work", type=Path, default=REPO / "work" / "benchmark_curate")
    args = parser.parse_args()
    for grid, count in (("4mm", args.cases_4mm), ("autopet", args.cases_autopet)):
        if not count:
            continue
        folder = args.work / f"source_{grid}"
        print(f"writing {count} {grid} studies to {folder} (once)", flush=True)
        write_source(folder, grid, count)
        source = Source(name=f"bench_{grid}", layout="autopet", path=folder, tracer="fdg")
        results = {}
        for workers in args.workers:
            results[workers] = result = measure(source, args.work / f"datastore_{grid}", workers)
            hours = PETS_5K / result["per_minute"] / 60.0
            print(f"{grid}, {workers} worker(s): {result['cases']} cases in {result['seconds']:.1f} s = "
                  f"{result['per_minute']:.1f} cases/min ({result['worker_seconds_per_case']:.2f} s per case inside "
                  f"a worker); {PETS_5K} scans: {hours:.1f} h on this machine", flush=True)
        if len(results) > 1:
            low, high = min(results), max(results)
            print(f"{grid}: {high} workers / {low}: {results[high]['per_minute'] / results[low]['per_minute']:.2f}x "
                  "the throughput")


if __name__ == "__main__":
    main()
