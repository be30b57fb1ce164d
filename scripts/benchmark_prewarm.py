"""A click on each new lesion, as a new annotator makes them, with and without warming the scan first.

Serves three 4 mm whole-body phantoms and one autoPET-sized phantom (400x400x326 at 2.036x2.036x3 mm) with the
shipped model. Each scan is fetched as Slicer opens it (``GET /datastore/image``), then after ``--pause`` seconds
every lesion is clicked once at its deepest voxel (a new lesion each time: no client id, nothing to refine),
then the first lesion once more with a second click one voxel away (a refinement: client id, previous mask).
Two servers in turn, the same clicks: ``--conf prewarm false`` (nothing precomputed: a click encodes its own
crops) and the default (the fetch starts `segany_pet.label.prewarm`). Clicks are timed from Python's
``requests`` as the project's OHIF add-on sends them (NRRD of the mask's box, ``label_box``, filled in to the
whole label: `nrrd_from_label_box`), back to back; the one-click Dice of every reply against the phantom's lesion
is printed for both servers, and whether their masks are the same.

Then, in this process, the warm-up plan's reach on ``--plan-cases`` more 4 mm phantoms: the share of lesions
whose centre click's crops are among the first 60 / 120 / 200 / all of the plan (about 0.07 s a crop on 2 cores,
so 120 is what a 10 s pause encodes).

    .venv/bin/python scripts/benchmark_prewarm.py [--pause 10] [--scans 3] [--plan-cases 10] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark_server import start_server  # noqa: E402

from segany_pet.label.infer import OHIF_RESULT_PARAMS  # noqa: E402
from segany_pet.label.models import DEFAULT_EMBEDDING_CACHE_MB, DEFAULT_MODEL, MODEL_DIR  # noqa: E402
from segany_pet.label.prewarm import CACHE_SHARE, warm_up_plan  # noqa: E402
from segany_pet.label.replies import LABEL_BOX_HEADER  # noqa: E402
from segany_pet.model import load_checkpoint  # noqa: E402
from segany_pet.pet import PETVolume, nrrd_from_label_box, save_nifti  # noqa: E402
from segany_pet.phantom import generate_case  # noqa: E402
from segany_pet.predictor import Predictor  # noqa: E402
from segany_pet.prompts import centre_click  # noqa: E402

ARMS = {"nothing precomputed": [("prewarm", "false")], "warmed on fetch": []}


def nrrd_mask(body: bytes, shape) -> np.ndarray:
    """The voxels of an uncompressed NRRD reply (`mask_nrrd`: header, blank line, voxels in Fortran order)."""
    start = body.index(b"\n\n") + 2
    return np.frombuffer(body[start:], dtype=np.uint8).reshape(shape, order="F")


def click(url: str, image: str, voxel, **extra) -> tuple[float, bytes]:
    """(seconds until the whole label is in hand, the label's NRRD file)."""
    params = {"foreground": [voxel], "background": [], **OHIF_RESULT_PARAMS, "label_box": True, **extra}
    started = time.perf_counter()
    reply = requests.post(f"{url}/infer/segany_pet", params={"image": image, "output": "image"},
                          files={"params": (None, json.dumps(params))})
    if reply.status_code != 200:
        raise RuntimeError(f"infer answered {reply.status_code}: {reply.text[:300]}")
    whole = nrrd_from_label_box(reply.content, reply.headers[LABEL_BOX_HEADER])
    return time.perf_counter() - started, bytes(whole)


def dice(mask: np.ndarray, truth: np.ndarray) -> float:
    overlap = np.logical_and(mask > 0, truth).sum()
    return float(2 * overlap / max(1, (mask > 0).sum() + truth.sum()))


def run_arm(studies: Path, scans: dict, conf, pause: float, log: Path) -> dict:
    process, url, _ = start_server(studies, log, conf)
    try:
        while requests.get(f"{url}/info/").json()["models"]["segany_pet"]["model"]["state"] != "ready":
            time.sleep(0.2)
        rows = []
        for name, (shape, lesions) in scans.items():
            requests.get(f"{url}/datastore/image", params={"image": name}).raise_for_status()
            time.sleep(pause)
            for index, (voxel, truth) in enumerate(lesions):
                seconds, body = click(url, name, voxel)
                rows.append({"scan": name, "kind": "new lesion", "first": index == 0, "seconds": seconds,
                             "dice": dice(nrrd_mask(body, shape), truth), "mask": body})
            voxel = lesions[0][0]
            click(url, name, voxel, client_id="refiner", reset=True)
            nearby = [voxel[0] + 1, *voxel[1:]]
            seconds, _ = click(url, name, nearby, client_id="refiner", refine=True)
            rows.append({"scan": name, "kind": "refinement", "first": False, "seconds": seconds})
        return {"rows": rows}
    finally:
        process.terminate()
        process.wait()


def plan_reach(cases: int, seed: int = 21) -> dict:
    """Share of lesions whose centre click's crops are within the first N crops of the warm-up plan."""
    model = load_checkpoint(MODEL_DIR / DEFAULT_MODEL)
    predictor = Predictor(model, cache_size=int(DEFAULT_EMBEDDING_CACHE_MB * 2**20 // model.preset.embedding_bytes))
    limit = int(predictor.cache_size * CACHE_SHARE)
    ranks = []
    for case_seed in range(seed, seed + cases):
        case = generate_case(case_seed, tracer="fdg" if case_seed % 2 else "psma", grid="4mm", negative=False)
        session = predictor.set_volume(PETVolume(case.suv, case.affine), str(case_seed))
        position = {crop: index for index, crop in enumerate(warm_up_plan(session, limit))}
        for lesion in case.info["lesions"]:
            crops = session.click_crops([centre_click(case.lesions == lesion["id"], case.info["spacing"])])
            ranks.append(max(position.get(crop, limit) for crop in crops))
    ranks = np.array(ranks)
    return {"lesions": len(ranks), "plan_limit": limit,
            **{f"within_{n}": float(np.mean(ranks < n)) for n in (60, 120, 200, limit)}}


def summary(rows: list[dict], kind: str, size: str) -> dict:
    chosen = [r for r in rows if r["kind"] == kind and r["scan"].startswith(size)]
    seconds = [r["seconds"] for r in chosen]
    record = {"n": len(chosen), "median_s": statistics.median(seconds), "max_s": max(seconds)}
    firsts = [r["seconds"] for r in chosen if r["first"]]
    if firsts:
        record["first_on_scan_median_s"] = statistics.median(firsts)
    if kind == "new lesion":
        record["dice_mean"] = float(np.mean([r["dice"] for r in chosen]))
    return record


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pause", type=float, default=10.0, help="seconds between fetching a scan and clicking")
    parser.add_argument("--scans", type=int, default=3, help="4 mm whole-body scans (and one autoPET-sized)")
    parser.add_argument("--plan-cases", type=int, default=10, help="4 mm phantoms for the plan's reach")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    revision = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()

    with tempfile.TemporaryDirectory() as tmp:
        studies = Path(tmp) / "images"
        studies.mkdir()
        scans = {}
        grids = [("wholebody_4mm", "4mm", 11 + i) for i in range(args.scans)] + [("autopet_size", "autopet", 11)]
        for prefix, grid, seed in grids:
            case = generate_case(seed, tracer="fdg" if seed % 2 else "psma", grid=grid, negative=False)
            name = f"{prefix}_{seed}"
            save_nifti(case.suv, case.affine, studies / f"{name}.nii.gz")
            lesions = [(centre_click(case.lesions == lesion["id"], case.info["spacing"]), case.lesions == lesion["id"])
                       for lesion in case.info["lesions"]]
            scans[name] = (case.suv.shape, lesions)
        results = {arm: run_arm(studies, scans, conf, args.pause, Path(tmp) / "server.log")
                   for arm, conf in ARMS.items()}

    cold, warm = (results[arm]["rows"] for arm in ARMS)
    same = [a["mask"] == b["mask"] for a, b in zip(cold, warm, strict=True) if a["kind"] == "new lesion"]
    print(f"Clicks on new lesions {args.pause:g} s after fetching the scan, shipped model, 2 cores "
          f"({time.strftime('%Y-%m-%d')}, {revision}; scripts/benchmark_prewarm.py)\n")
    print("| scans | click | nothing precomputed: median (max) s | warmed on fetch: median (max) s | ratio |")
    print("|---|---|---|---|---|")
    figures = {}
    for size in ("wholebody_4mm", "autopet_size"):
        for kind in ("new lesion", "refinement"):
            a, b = summary(cold, kind, size), summary(warm, kind, size)
            figures[f"{size} {kind}"] = {"nothing precomputed": a, "warmed on fetch": b}
            print(f"| {size} | {kind} (n={a['n']}) | {a['median_s']:.3f} ({a['max_s']:.3f}) | "
                  f"{b['median_s']:.3f} ({b['max_s']:.3f}) | {a['median_s'] / b['median_s']:.1f}x |")
    print()
    for size in ("wholebody_4mm", "autopet_size"):
        record = figures[f"{size} new lesion"]
        refinement = figures[f"{size} refinement"]["warmed on fetch"]["median_s"]
        print(f"{size}: first click on each scan {record['nothing precomputed']['first_on_scan_median_s']:.3f} s "
              f"cold, {record['warmed on fetch']['first_on_scan_median_s']:.3f} s warmed; new-lesion click / "
              f"refinement click (warmed) {record['warmed on fetch']['median_s'] / refinement:.2f}x; one-click Dice "
              f"{record['nothing precomputed']['dice_mean']:.4f} cold, {record['warmed on fetch']['dice_mean']:.4f} "
              f"warmed")
    print(f"masks identical between the two servers: {sum(same)} of {len(same)} clicks")
    reach = plan_reach(args.plan_cases)
    print(f"\nwarm-up plan's reach over {reach['lesions']} lesions of {args.plan_cases} more 4 mm phantoms: "
          + ", ".join(f"{share:.0%} within the first {key.split('_')[1]} crops" for key, share in reach.items()
                      if key.startswith("within")))
    if args.json:
        args.json.write_text(json.dumps({"pause_s": args.pause, "figures": figures, "identical_masks": sum(same),
                                         "clicks": len(same), "plan_reach": reach}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
