"""Fit the hot-spot classifier (organ uptake or lesion, `segany_pet.active.organs`) on phantom hot spots and
measure it on held-out phantoms.

Phantoms of both tracers on the 4 mm grid (and ``--autopet`` autoPET-sized ones), drawn from seeds no other
cohort of the project uses. Every hot spot the scorer would consider (regions above PERCIST's threshold from
the image's own liver estimate, up to ``--spots`` per scan) is a lesion when the phantom's lesion map holds
its hottest voxel, organ uptake otherwise. Fitted on ``--fit`` scans per tracer, measured on ``--held-out``
others: AUROC, accuracy at probability 0.5, the share of organ spots kept as lesions per organ, and of lesion
spots dropped. Writes the classifier (default model/hot_spot_classifier.json) with these figures.

    .venv/bin/python scripts/fit_hot_spot_classifier.py [--fit 40] [--held-out 20] [--autopet 4]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
from benchmark_cpcl import auroc

from segany_pet.active.cross_prompt import hot_spot_threshold, hot_spots, liver_reference
from segany_pet.active.organs import CLASSIFIER_FILE, LESION_PROBABILITY, describe_hot_spots, fit_classifier
from segany_pet.pet import PETVolume
from segany_pet.phantom import generate_case

SPLIT = 90  # phantom seeds: SeedSequence([SPLIT, part, index]), apart from every benchmark cohort


def spots_of(index: int, part: int, tracer: str, grid: str, limit: int) -> tuple[np.ndarray, list[bool], list[str]]:
    seed = int(np.random.SeedSequence([SPLIT, part, index]).generate_state(1)[0])
    case = generate_case(seed, tracer, grid, negative=index % 5 == 4)
    volume = PETVolume(case.suv, case.affine)
    liver = liver_reference(volume)
    threshold = hot_spot_threshold(volume, liver)
    spots = hot_spots(volume, threshold, limit=limit)
    features, _ = describe_hot_spots(volume, spots, threshold, liver)
    lesion = [bool(case.lesions[tuple(s)] > 0) for s in spots]
    where = [tracer + ":" + ("lesion" if hit else case.organ_names.get(int(case.organs[tuple(s)]), "background"))
             for s, hit in zip(spots, lesion, strict=True)]
    return features, lesion, where


def collect(count: int, part: int, autopet: int, limit: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    features, lesion, where = [], [], []
    jobs = [(i, t, "4mm") for i in range(count) for t in ("fdg", "psma")]
    jobs += [(count + i, t, "autopet") for i in range(autopet) for t in ("fdg", "psma")]
    for index, tracer, grid in jobs:
        spot_features, is_lesion, places = spots_of(index * 2 + (tracer == "psma"), part, tracer, grid, limit)
        features.append(spot_features)
        lesion += is_lesion
        where += places
    return np.concatenate(features), np.asarray(lesion), where


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fit", type=int, default=40, help="fitting phantoms per tracer (4 mm)")
    parser.add_argument("--held-out", type=int, default=20, help="held-out phantoms per tracer (4 mm)")
    parser.add_argument("--autopet", type=int, default=4, help="autoPET-sized phantoms per tracer, each split")
    parser.add_argument("--spots", type=int, default=48, help="hot spots per scan at most")
    parser.add_argument("--hidden", type=int, default=32, help="units of the hidden layer")
    parser.add_argument("--out", type=Path, default=CLASSIFIER_FILE)
    args = parser.parse_args()

    started = time.perf_counter()
    x_fit, y_fit, _ = collect(args.fit, 0, args.autopet, args.spots)
    x_test, y_test, where = collect(args.held_out, 1, args.autopet, args.spots)
    print(f"hot spots: {len(y_fit)} to fit ({int(y_fit.sum())} lesions), {len(y_test)} held out "
          f"({int(y_test.sum())} lesions); {time.perf_counter() - started:.0f} s", flush=True)
    classifier = fit_classifier(x_fit, y_fit, {}, args.hidden)
    probability = classifier.lesion_probability(x_test)
    kept = probability >= LESION_PROBABILITY
    per_place = Counter(where)
    kept_per_place = Counter(w for w, k in zip(where, kept, strict=True) if k)
    held_out = {
        "spots": len(y_test), "lesions": int(y_test.sum()),
        "auroc": round(auroc(probability.tolist(), y_test.tolist()), 4),
        "accuracy": round(float(np.mean(kept == y_test)), 4),
        "lesions_kept": round(float(kept[y_test].mean()), 4),
        "organ_spots_kept": round(float(kept[~y_test].mean()), 4),
        "kept_share_by_place": {w: f"{kept_per_place[w]}/{n}" for w, n in sorted(per_place.items())},
    }
    provenance = {"command": "scripts/fit_hot_spot_classifier.py " + " ".join(sys.argv[1:]),
                  "fit_spots": len(y_fit), "fit_lesions": int(y_fit.sum()), "held_out": held_out}
    classifier.provenance = provenance
    classifier.save(args.out)
    print(f"held out: AUROC {held_out['auroc']:.3f}, accuracy {held_out['accuracy']:.3f}, lesion spots kept "
          f"{held_out['lesions_kept']:.3f}, organ spots kept {held_out['organ_spots_kept']:.3f}")
    for place, share in held_out["kept_share_by_place"].items():
        print(f"  kept as lesion  {place:28s} {share}")
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
