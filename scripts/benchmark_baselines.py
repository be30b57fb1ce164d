"""Dice of the classical seeded threshold methods on synthetic lesions, isolated vs touching an organ.

One click per lesion at its centre (the autoPET IV lesion click: deepest voxel of the lesion),
each method grown from it, scored against that lesion alone. The relative thresholds (41%, 50%, sized) are
grown a second time cut from hotter neighbours at the saddle (``peak_prominence``, as the app's uptake edge grows them),
and every row is timed on a click at the hottest voxel of each case's bladder and brain too (a region as
large as an organ: the worst case of the cut).

    .venv/bin/python scripts/benchmark_baselines.py --cases 16 [--grid autopet]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict

import numpy as np
from tqdm import tqdm

from segany_pet.evaluate import lesion_dice
from segany_pet.pet.organs import ORGAN_NAMES
from segany_pet.phantom import generate_case
from segany_pet.prompts import centre_click
from segany_pet.segment import METHODS, segment_from_clicks
from segany_pet.segment.edge import PEAK_PROMINENCE

ORGANS = {name: label for label, name in ORGAN_NAMES.items() if name in ("bladder", "brain")}
CUT = f"saddle cut {PEAK_PROMINENCE:g}"
# (row name, method, peak prominence): the classical methods, then the relative ones cut at saddles.
VARIANTS = [(method, method, None) for method in METHODS] + [
    (f"{method}, {CUT}", method, PEAK_PROMINENCE) for method in METHODS if not method.startswith("fixed")
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", type=int, default=16, help="positive cases, FDG and PSMA alternating")
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--grid", choices=["4mm", "autopet"], default="4mm")
    args = parser.parse_args()

    scores: dict[tuple[str, str], list[float]] = defaultdict(list)
    seconds: dict[str, list[float]] = defaultdict(list)
    organ_seconds: dict[tuple[str, str], list[float]] = defaultdict(list)
    lesions_seen = 0
    for index in tqdm(range(args.cases), desc="cases", unit="case"):
        tracer = "fdg" if index % 2 == 0 else "psma"
        case = generate_case(args.seed + index, tracer=tracer, grid=args.grid, negative=False)
        spacing = tuple(case.info["spacing"])
        for lesion in case.info["lesions"]:
            lesions_seen += 1
            group = "touching" if lesion["touches"] else "isolated"
            click = centre_click(case.lesions == lesion["id"], spacing)
            for name, method, prominence in VARIANTS:
                started = time.perf_counter()
                mask = segment_from_clicks(case.suv, spacing, [click], method=method, peak_prominence=prominence)
                seconds[name].append(time.perf_counter() - started)
                scores[(name, group)].append(lesion_dice(mask, case.lesions, lesion["id"]))
        for organ, label in ORGANS.items():
            inside = np.where(case.organs == label, case.suv, -np.inf)
            hottest = [int(i) for i in np.unravel_index(np.argmax(inside), inside.shape)]
            for name, method, prominence in VARIANTS:
                started = time.perf_counter()
                segment_from_clicks(case.suv, spacing, [hottest], method=method, peak_prominence=prominence)
                organ_seconds[(name, organ)].append(time.perf_counter() - started)

    print(f"\n{lesions_seen} lesions in {args.cases} {args.grid} cases (seed {args.seed}), one centre click each\n")
    clicked = " / ".join(["lesion", *ORGANS])
    print(f"| method | isolated Dice (n) | touching an organ Dice (n) | all | ms per click: {clicked} |")
    print("|---|---|---|---|---|")
    for name, _, _ in VARIANTS:
        cells = []
        for group in ("isolated", "touching"):
            values = scores[(name, group)]
            cells.append(f"{statistics.fmean(values):.3f} ({len(values)})" if values else "- (0)")
        both = scores[(name, "isolated")] + scores[(name, "touching")]
        milliseconds = [seconds[name]] + [organ_seconds[(name, organ)] for organ in ORGANS]
        milliseconds = " / ".join(f"{1000 * statistics.median(times):.1f}" for times in milliseconds)
        print(f"| {name} | {cells[0]} | {cells[1]} | {statistics.fmean(both):.3f} | {milliseconds} |")


if __name__ == "__main__":
    main()
