"""Seconds per click of the interactive predictor: cold (crop + encode + decode + paste) and warm (cached).

For each preset (random weights: speed does not depend on them), on a synthetic 4 mm whole-body phantom
(128x128x240) and an autoPET-sized one (400x400x326 at 2.036x2.036x3 mm), clicking on a lesion:
cold = the first click on a volume (its crop is encoded), warm = refinement clicks next to it whose crop
embedding is cached (median of --warm). A preset with a scale ensemble (`ensemble_spacings_mm`) is timed
with it and, in the next row, at its `spacing_mm` alone. Times are seconds of wall clock; other processes on
the machine inflate them, torch's 2-thread kernels most of all.

    .venv/bin/python scripts/benchmark_predictor.py
    .venv/bin/python scripts/benchmark_predictor.py --presets segany_pet_small --max-windows 6
"""

from __future__ import annotations

import argparse
import gc
import resource
import time

import torch

from segany_pet.model import PRESETS, build_model
from segany_pet.pet.volume import PETVolume
from segany_pet.phantom import generate_case
from segany_pet.predictor import Predictor
from segany_pet.prompts import centre_click
from segany_pet.session import LATENCY_KEYS

GRIDS = {"4mm": "4 mm whole body", "autopet": "autoPET grid"}


def reset_peak_rss() -> bool:
    """Restart the kernel's peak-RSS counter (Linux), so the peak of the predicting part can be read."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    with open("/proc/self/status") as handle:
        line = next(line for line in handle if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


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

    phantoms_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    gc.collect()
    peak_since_phantoms = reset_peak_rss()
    print(f"threads {args.threads}, encoder dtype {args.dtype or 'float32'}, max_windows {args.max_windows}\n")
    print(
        "| preset | crop spacings mm | volume | shape | set_volume s | cold s | cold breakdown | warm s "
        "| warm breakdown | cold/warm | windows |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    first_clicks = []
    runs = [(name, ensemble) for name in args.presets
            for ensemble in ((True, False) if PRESETS[name].ensemble_spacings_mm else (True,))]
    for name, ensemble in runs:
        torch.manual_seed(0)
        predictor = Predictor(build_model(name), cache_size=8, dtype=args.dtype, max_windows=args.max_windows,
                              scale_ensemble=ensemble)
        spacings = " + ".join(f"{spacing:g}" for spacing in predictor.spacings)
        # torch's first forward passes allocate and pick kernels (seconds): one throwaway click, reported apart
        warm_up_volume, warm_up_click = next(iter(cases.values()))
        first = predictor.set_volume(warm_up_volume, "warm-up").predict(foreground=[warm_up_click])
        first_clicks.append(f"{name} at {spacings} mm: {first.latencies['total']:.2f} s ({breakdown(first.latencies)})")
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
                f"| {name} | {spacings} | {GRIDS[grid]} | {'x'.join(map(str, volume.shape))} | {set_seconds:.2f} "
                f"| {cold_s:.2f} "
                f"| {breakdown(cold.latencies)} | {warm_s:.3f} | {breakdown(median.latencies)} "
                f"| {cold_s / warm_s:.0f} | {cold.windows} |"
            )
    print("\nfirst click after building the model (not in the table):\n  " + "\n  ".join(first_clicks))
    print(f"\npeak RSS while generating the phantoms: {phantoms_mb:.0f} MB")
    if peak_since_phantoms:
        print(f"peak RSS while predicting (phantoms kept in memory, models built in turn): {peak_rss_mb():.0f} MB")
    else:
        print(f"peak RSS of the run: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
