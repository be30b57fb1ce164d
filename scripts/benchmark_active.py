"""Active learning at cohort scale: strategy and /info latency on a 6,000-scan datastore, and scoring throughput.

1. A datastore of ``--scans`` tiny images (4^3 voxels: the strategies read scores, not pixels) with random
   cross-prompt scores on every scan and labels on a tenth, served by the app: the median and maximum time of
   ``POST /activelearning/disagreement`` (each request from a new client, so each leases a new scan) and
   ``label_review``, next to MONAI Label's own ``random`` strategy on the same datastore, and of ``GET /info/``;
   and one image-info write through PETDatastore next to MONAI Label's LocalDatastore.
2. Scoring throughput with the shipped model (``segany-pet score``'s code path, in process): scans per minute
   on 4 mm whole-body phantoms and on autoPET-sized ones (400x400x326), and the projected time for a
   5,731-scan cohort (PETS-5k) on one machine and on N machines (ranks shard the scans; each writes its
   scores under the datastore's file lock).
3. The same autoPET-sized scans rescored by the command line, ``segany-pet score --force``, as one process of 2
   torch threads and as two ranks of one thread each on the same 2 cores (``RANK`` / ``WORLD_SIZE``, as
   torchrun sets them): wall time from launch to the last exit (process start and model load included), and
   the scans per minute the ranks report (scoring alone), with the PETS-5k projection of each.

    .venv/bin/python scripts/benchmark_active.py [--scans 6000] [--requests 30] [--score-4mm 4] [--score-autopet 6]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import requests
import torch
from benchmark_server import start_server  # the same server start as the click benchmark
from monailabel.datastore.local import LocalDatastore

from segany_pet.active.scoring import models_key, score_datastore, scoring_predictor
from segany_pet.label.datastore import PETDatastore
from segany_pet.model import load_checkpoint
from segany_pet.pet import save_nifti
from segany_pet.phantom import generate_case

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "model" / "segany_pet_small.pt"
PETS_5K = 5731


def timed_requests(method, url: str, count: int, client: str | None = None) -> tuple[list[float], list]:
    """``count`` requests, each from a new client when ``client`` names them: (seconds, JSON answers)."""
    seconds, answers = [], []
    for index in range(count):
        body = {"client_id": f"{client}-{index}"} if client else None
        started = time.perf_counter()
        response = method(url, timeout=60, json=body)
        seconds.append(time.perf_counter() - started)
        response.raise_for_status()
        answers.append(response.json())
    return seconds, answers


def summary(seconds: list[float]) -> str:
    return f"median {1000 * statistics.median(seconds):.1f} ms, max {1000 * max(seconds):.1f} ms"


def scale(folder: Path, scans: int, count: int) -> None:
    rng = np.random.default_rng(0)
    tiny = np.ones((4, 4, 4), np.float32)
    for index in range(scans):
        save_nifti(tiny, np.eye(4), folder / f"scan{index:05d}.nii.gz")
    started = time.perf_counter()
    datastore = PETDatastore(str(folder), extensions=("*.nii.gz",), auto_reload=False)
    print(f"{scans} scans: datastore built in {time.perf_counter() - started:.1f} s")
    label = folder.parent / "label.nii.gz"
    save_nifti(np.zeros((4, 4, 4), np.uint8), np.eye(4), label)
    for index in range(0, scans, 10):
        datastore.save_label(f"scan{index:05d}", str(label), "final", {})
    datastore.update_image_infos({
        f"scan{index:05d}": {"cross_prompt_disagreement": float(rng.random()),
                             "label_noise_score": float(rng.random()) if index % 10 == 0 else None,
                             "cross_prompt_worst": [{"voxel": [1, 2, 3], "kind": "hot_spot", "disagreement": 0.5}]}
        for index in range(scans)
    })
    writes = {}
    for name, kind in (("PETDatastore", PETDatastore), ("MONAI Label's LocalDatastore", LocalDatastore)):
        store = kind(str(folder), extensions=("*.nii.gz",), auto_reload=False)
        seconds = []
        for index in range(5):
            started = time.perf_counter()
            store.update_image_info(f"scan{index:05d}", {"benchmark_write": index})
            seconds.append(time.perf_counter() - started)
        writes[name] = statistics.median(seconds)
    ours, theirs = writes.values()
    print(f"one image-info update at {scans} scans (median of 5): PETDatastore {1000 * ours:.0f} ms, MONAI Label's "
          f"LocalDatastore {1000 * theirs:.0f} ms ({theirs / ours:.1f}x)")
    log = folder.parent / "server.log"
    process, url, start_seconds = start_server(folder, log)
    try:
        print(f"server start to first /info: {start_seconds:.1f} s\n")
        rows = []
        for strategy in ("disagreement", "label_review", "random"):
            seconds, answers = timed_requests(requests.post, f"{url}/activelearning/{strategy}", count, strategy)
            served = [answer.get("id") for answer in answers]
            distinct = len(set(served)) == len(served) and None not in served
            rows.append((f"POST /activelearning/{strategy}", summary(seconds),
                         "yes" if distinct else "no (not leased)"))
        info_seconds, _ = timed_requests(requests.get, f"{url}/info/", count)
        rows.append(("GET /info/", summary(info_seconds), "-"))
        print(f"| request ({scans} scans, {count} requests each) | time | every answer a different scan |")
        print("|---|---|---|")
        for row in rows:
            print("| " + " | ".join(row) + " |")
    finally:
        process.terminate()
        process.wait()


def throughput(folder: Path, grid: str, scans: int, predictor) -> float:
    for index in range(scans):
        case = generate_case(100 + index, "fdg" if index % 2 == 0 else "psma", grid, negative=False)
        save_nifti(case.suv, case.affine, folder / f"{grid}_{index}.nii.gz")
        save_nifti((case.lesions > 0).astype(np.uint8), case.affine, folder.parent / f"label_{grid}_{index}.nii.gz")
    datastore = PETDatastore(str(folder), extensions=("*.nii.gz",), auto_reload=False)
    for index in range(0, scans, 2):  # half the scans labeled: their label components are targets too
        datastore.save_label(f"{grid}_{index}", str(folder.parent / f"label_{grid}_{index}.nii.gz"), "final", {})
    result = score_datastore(datastore, predictor, predictor, models_key(MODEL, None))
    if not result["scored"]:
        raise RuntimeError(f"no {grid} scan was scored: {result}")
    per_minute = result["scans_per_minute"]
    targets = [datastore.get_image_info(image)["targets"] for image in datastore.list_images()]
    mean_targets = statistics.mean(t["label"] + t["hot_spot"] for t in targets)
    print(f"| {grid} | {scans} | {mean_targets:.1f} | {result['seconds']:.1f} | {per_minute:.2f} | "
          f"{PETS_5K / per_minute / 60:.1f} h | {PETS_5K / per_minute / 60 / 4:.1f} h | "
          f"{PETS_5K / per_minute / 60 / 16:.1f} h |")
    return per_minute


def processes(folder: Path, scans: int) -> None:
    """Rescore ``folder`` by the command line: one process of 2 threads, then two ranks of one thread."""
    print(f"\n`segany-pet score --force` on the {scans} autoPET-sized scans, 2 cores")
    print("| processes x torch threads | wall s (start included) | scans/min, wall | scans/min, ranks' own "
          "| PETS-5k, 1 machine (ranks' own) |")
    print("|---|---|---|---|---|")
    rates = {}
    for world_size, threads in ((1, 2), (2, 1)):
        started = time.perf_counter()
        ranks = [subprocess.Popen([sys.executable, "-m", "segany_pet.cli", "score", str(folder), "--force",
                                   "--model", str(MODEL), "--threads", str(threads)],
                                  env={**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world_size),
                                       "OMP_NUM_THREADS": str(threads)},
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
                 for rank in range(world_size)]
        outputs = [rank.communicate()[0] for rank in ranks]
        wall = time.perf_counter() - started
        if any(rank.returncode for rank in ranks):
            raise RuntimeError(f"segany-pet score failed: {outputs}")
        own = sum(float(re.search(r"([0-9.]+) scans/min", out).group(1)) for out in outputs)
        rates[world_size] = own
        print(f"| {world_size} x {threads} | {wall:.1f} | {60 * scans / wall:.2f} | {own:.2f} | "
              f"{PETS_5K / own / 60:.1f} h |")
    print(f"\ntwo ranks against one process: {rates[2] / rates[1]:.2f}x the scans per minute")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scans", type=int, default=6000)
    parser.add_argument("--requests", type=int, default=30)
    parser.add_argument("--score-4mm", type=int, default=4, help="4 mm phantoms to score")
    parser.add_argument("--score-autopet", type=int, default=6, help="autoPET-sized phantoms to score")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        studies = Path(tmp) / "scale" / "images"
        studies.mkdir(parents=True)
        scale(studies, args.scans, args.requests)

        predictor = scoring_predictor(load_checkpoint(MODEL))
        print(f"\nscoring with {MODEL.name}, {args.threads} torch threads, half the scans labeled")
        print("| grid | scans | targets per scan | seconds | scans/min | PETS-5k, 1 machine | 4 machines "
              "| 16 machines |")
        print("|---|---|---|---|---|---|---|---|")
        for grid, count in ((grid, count) for grid, count in (("4mm", args.score_4mm),
                                                                  ("autopet", args.score_autopet)) if count):
            folder = Path(tmp) / grid / "images"
            folder.mkdir(parents=True)
            throughput(folder, grid, count, predictor)
        if args.score_autopet:
            processes(Path(tmp) / "autopet" / "images", args.score_autopet)
    print(f"\n{os.cpu_count()} CPU cores")


if __name__ == "__main__":
    main()
