"""Dice of the classical seeded threshold methods on synthetic lesions, isolated vs touching an organ.

One click per lesion at its centre (the autoPET IV lesion click: deepest voxel of the lesion),
each method grown from it, scored against that lesion alone.

    .venv/bin/python scripts/benchmark_baselines.py --cases 16
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict

from tqdm import tqdm

from segany_pet.evaluate import METHODS, lesion_dice, segment_from_clicks
from segany_pet.phantom import generate_case
from segany_pet.prompts import centre_click


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", type=int, default=16, help="positive cases, FDG and PSMA alternating")
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--grid", choices=["4mm", "autopet"], default="4mm")
    args = parser.parse_args()

    scores: dict[tuple[str, str], list[float]] = defaultdict(list)
    seconds: dict[str, list[float]] = defaultdict(list)
    lesions_seen = 0
    for index in tqdm(range(args.cases), desc="cases", unit="case"):
        tracer = "fdg" if index % 2 == 0 else "psma"
        case = generate_case(args.seed + index, tracer=tracer, grid=args.grid, negative=False)
        spacing = tuple(case.info["spacing"])
        for lesion in case.info["lesions"]:
            lesions_seen += 1
            group = "touching" if lesion["touches"] else "isolated"
            click = centre_click(case.lesions == lesion["id"], spacing)
            for method in METHODS:
                started = time.perf_counter()
                mask = segment_from_clicks(case.suv, spacing, [click], method=method)
                seconds[method].append(time.perf_counter() - started)
                scores[(method, group)].append(lesion_dice(mask, case.lesions, lesion["id"]))

    print(f"\n{lesions_seen} lesions in {args.cases} {args.grid} cases (seed {args.seed}), one centre click each\n")
    print("| method | isolated Dice (n) | touching an organ Dice (n) | all | ms per click |")
    print("|---|---|---|---|---|")
    for method in METHODS:
        cells = []
        for group in ("isolated", "touching"):
            values = scores[(method, group)]
            cells.append(f"{statistics.fmean(values):.3f} ({len(values)})" if values else "- (0)")
        both = scores[(method, "isolated")] + scores[(method, "touching")]
        milliseconds = 1000 * statistics.median(seconds[method])
        print(f"| {method} | {cells[0]} | {cells[1]} | {statistics.fmean(both):.3f} | {milliseconds:.1f} |")


if __name__ == "__main__":
    main()
