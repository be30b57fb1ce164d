"""Seconds per click of the interactive predictor: cold (crop + encode + decode + paste) and warm (cached).

For each preset (random weights: speed does not depend on them), on a synthetic 4 mm whole-body phantom
(128x128x240) and an autoPET-sized one (400x400x326 at 2.036x2.036x3 mm), clicking on a lesion:
the first click, then refinement clicks next to it whose crop embedding is cached (median of --warm).

    .venv/bin/python scripts/benchmark_predictor.py
    .venv/bin/python scripts/benchmark_predictor.py --presets segany_pet_small --max-windows 6
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from segany_pet.model import PRESETS, build_model
from segany_pet.pet.volume import PETVolume
from segany_pet.phantom import generate_case
from segany_pet.predictor import LATENCY_KEYS, Predictor
from segany_pet.prompts import centre_click

GRIDS = {"4mm": "4 mm whole body", "autopet": "autoPET grid"}


def breakdown(latencies: dict) -> str:
    return " ".join(f"{key} {1000 * latencies[key]:.0f}" for key in LATENCY_KEYS) + " ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    parser.add_argument("--grids", nargs="+", default=list(GRIDS), choices=list(GRIDS))
    parser.add_argument("--warm", type=int, default=5, help="warm clicks per volume (median reported)")
    parser.add_argument(
        "--max-windows", type=int, default=1,
        help="windows per object; random weights predict masks that fill the crop, so >1 measures extension",
    )
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="image encoder dtype")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    cases = {}
    for grid in args.grids:
        case = generate_case(1, tracer="fdg", grid=grid, negative=False)
        lesion = max(case.info["lesions"], key=lambda item: item["volume_ml"])
        click = centre_click(case.lesions == lesion["id"], tuple(case.info["spacing"]))
        cases[grid] = (PETVolume(case.suv, case.affine), click)

    print(f"threads {args.threads}, encoder dtype {args.dtype or 'float32'}, max_windows {args.max_windows}\n")
    print(
        "| preset | volume | shape | set_volume s | cold s | cold breakdown | warm s | warm breakdown "
        "| cold/warm | windows |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in args.presets:
        torch.manual_seed(0)
        predictor = Predictor(build_model(name), cache_size=8, dtype=args.dtype, max_windows=args.max_windows)
        # one throwaway click: torch's first calls allocate and pick kernels
        warm_up_volume, warm_up_click = next(iter(cases.values()))
        predictor.set_volume(warm_up_volume, "warm-up").predict(foreground=[warm_up_click])
        predictor.clear_cache()
        for grid, (volume, click) in cases.items():
            started = time.perf_counter()
            session = predictor.set_volume(volume)  # content hash: the id clients would otherwise send
            set_seconds = time.perf_counter() - started
            cold = session.predict(foreground=[click])
            warm, previous = [], cold
            for step in range(args.warm):
                # refinement clicks next to the first one, alternately foreground and background
                nearby = [[click[0] + 1 + step % 2, click[1], click[2]]]
                prompts = {"background": nearby} if step % 2 else {"foreground": nearby}
                previous = session.predict(**prompts, previous=previous)
                assert previous.cache_hit, "warm click missed the embedding cache"
                warm.append(previous)
            median = sorted(warm, key=lambda p: p.latencies["total"])[len(warm) // 2]  # the median click
            cold_s, warm_s = cold.latencies["total"], median.latencies["total"]
            print(
                f"| {name} | {GRIDS[grid]} | {'x'.join(map(str, volume.shape))} | {set_seconds:.2f} | {cold_s:.2f} "
                f"| {breakdown(cold.latencies)} | {warm_s:.3f} | {breakdown(median.latencies)} "
                f"| {cold_s / warm_s:.0f} | {cold.windows} |"
            )
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\npeak RSS {peak_mb:.0f} MB (phantoms included: the autoPET one is ~200 MB of SUV plus its labels)")


if __name__ == "__main__":
    main()
