"""Active learning quality: does ``label_noise_score`` find corrupted labels, and does annotating by cross-prompt
disagreement raise held-out Dice faster than annotating in random order?

1. Label review. ``--review-cases`` labeled 4 mm phantoms (FDG and PSMA); the project's noise injector corrupts
   each label with probability ``--corrupt-rate`` (every kind, records kept). Every scan is scored the way
   ``POST /scoring/cross_prompt`` scores it (`score_image`, the shipped model prompted by points and by boxes);
   printed: the AUROC of ``label_noise_score`` against the injector's records, the precision among the top
   10% and the top half, and each corrupted label's rank with what was done to it.
2. Annotation rounds. A start model trained from scratch on ``--seed-cases`` labeled phantoms, a pool of
   ``--pool-cases`` unlabeled ones and a separate clean test split. Each round, each strategy takes
   ``--per-round`` scans from its remaining pool, receives their true labels, and fine-tunes its own current
   model for ``--steps`` steps on all its labels (same steps, seed and learning rate for both):

     disagreement  the scans the strategy serves (`annotation_priority`: highest ``cross_prompt_disagreement``
                   under the strategy's current model, scored as in 1.)
     random        a seeded random draw

   After every round, Dice after one click on the test split (the interactive benchmark's protocol). Printed
   as a table, plotted to ``OUT/learning_curve.png``, all figures in ``OUT/results.json``.

    .venv/bin/python scripts/benchmark_active_learning.py [--review-cases 20] [--corrupt-rate 0.5]
        [--seed-cases 4] [--seed-steps 300] [--pool-cases 20] [--test-cases 6] [--rounds 3] [--per-round 4]
        [--steps 150] [--seed 0] [--skip-review | --skip-rounds] [--out work/active_learning]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from benchmark_cpcl import auroc, evaluate, noisy_labels, write_cohort  # the CPCL ablation's cohort and scoring

from segany_pet.active.audit import pyplot_agg
from segany_pet.active.scoring import annotation_priority, score_image, scoring_predictor
from segany_pet.model import load_checkpoint
from segany_pet.train import MODEL_BEST, make_trainer

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "model" / "segany_pet_small.pt"
STRATEGIES = ("disagreement", "random")


def label_review(folder: Path, cases: int, corrupt_rate: float, seed: int) -> dict:
    """Part 1: rank every label by ``label_noise_score`` and compare with the injector's records."""
    ids = write_cohort(folder, cases, seed, 10)
    records = noisy_labels(folder, ids, seed, low_share=1.0, corrupt_rate=corrupt_rate)
    predictor = scoring_predictor(load_checkpoint(MODEL))
    started = time.perf_counter()
    rows = []
    for case_id in ids:
        scores = score_image(predictor, predictor, case_id, str(folder / "images" / f"{case_id}.nii.gz"),
                             str(folder / "labels" / f"{case_id}.nii.gz"))
        record = records[case_id]
        rows.append({"id": case_id, "label_noise_score": scores["label_noise_score"],
                     "corrupted": record["corrupted"], "label_dice": record["label_dice"],
                     "operations": [op["kind"] for op in record["operations"]]})
    seconds = time.perf_counter() - started
    rows.sort(key=lambda r: r["label_noise_score"], reverse=True)
    flags = [r["corrupted"] for r in rows]
    top10, half = max(1, round(0.1 * len(rows))), max(1, len(rows) // 2)
    return {"cases": len(rows), "corrupted": sum(flags), "seconds": round(seconds, 1),
            "auroc": auroc([r["label_noise_score"] for r in rows], flags),
            "precision_top10": sum(flags[:top10]) / top10, "precision_top_half": sum(flags[:half]) / half,
            "recall_top_half": sum(flags[:half]) / max(1, sum(flags)), "ranking": rows}


def train(run: Path, init: Path | None, records: list[dict], steps: int, seed: int, threads: int) -> Path:
    """Fine-tune ``init`` (None: from scratch, the default preset) on ``records``; returns the model file."""
    config = {"output_dir": str(run), "init_checkpoint": str(init) if init else None, "epochs": 1,
              "iterations_per_epoch": steps, "batch_size": 2, "lr": 3e-4, "warmup_iterations": 10,
              "val_cases": 0, "seed": seed, "threads": threads, "progress_bar": False}
    make_trainer(config, records).run()
    return run / MODEL_BEST


def disagreement_order(model_file: Path, folder: Path, pool: list[str]) -> list[str]:
    """The pool in the order the ``disagreement`` strategy serves it under ``model_file``."""
    predictor = scoring_predictor(load_checkpoint(model_file))
    infos = {case_id: score_image(predictor, predictor, case_id, str(folder / "images" / f"{case_id}.nii.gz"), None)
             for case_id in pool}
    return sorted(pool, key=lambda case_id: annotation_priority(infos[case_id], False), reverse=True)


def annotation_rounds(args, folder: Path) -> dict:
    """Part 2: both strategies from one start model, round by round; Dice after one click on the test split."""
    seed_ids = write_cohort(folder / "seed", args.seed_cases, args.seed, 20)
    pool_ids = write_cohort(folder / "pool", args.pool_cases, args.seed, 21)
    test_ids = write_cohort(folder / "test", args.test_cases, args.seed, 22)
    for split, ids in (("seed", seed_ids), ("pool", pool_ids)):
        noisy_labels(folder / split, ids, args.seed, low_share=0.0, corrupt_rate=0.0)  # true labels, binary

    def record(split: str, case_id: str) -> dict:
        return {"id": case_id, "image": str(folder / split / "images" / f"{case_id}.nii.gz"),
                "label": str(folder / split / "labels" / f"{case_id}.nii.gz"), "tier": "high"}

    print(f"start model: {args.seed_steps} steps from scratch on {len(seed_ids)} phantoms", flush=True)
    start = train(folder / "run_start", None, [record("seed", i) for i in seed_ids], args.seed_steps, args.seed,
                  args.threads)
    start_dice = evaluate(start, folder / "test", test_ids, 1)["dice_1"]
    print(f"round 0: Dice after one click {start_dice:.3f}", flush=True)
    curves = {}
    for strategy in STRATEGIES:
        rng = np.random.default_rng(args.seed)
        model, labeled, remaining = start, [record("seed", i) for i in seed_ids], list(pool_ids)
        curve = [{"round": 0, "labeled": len(labeled), "dice_1": start_dice, "chosen": []}]
        for round_index in range(1, args.rounds + 1):
            started = time.perf_counter()
            if strategy == "disagreement":
                order = disagreement_order(model, folder / "pool", remaining)
            else:
                order = [str(i) for i in rng.permutation(remaining)]
            chosen = order[: args.per_round]
            remaining = [i for i in remaining if i not in chosen]
            labeled += [record("pool", i) for i in chosen]
            model = train(folder / f"run_{strategy}_{round_index}", model, labeled, args.steps,
                          args.seed + round_index, args.threads)
            scores = evaluate(model, folder / "test", test_ids, 1)
            curve.append({"round": round_index, "labeled": len(labeled), "dice_1": scores["dice_1"],
                          "chosen": chosen, "seconds": round(time.perf_counter() - started)})
            print(f"{strategy} round {round_index}: {len(labeled)} labeled, Dice after one click "
                  f"{scores['dice_1']:.3f} ({curve[-1]['seconds']} s; chose {', '.join(chosen)})", flush=True)
        curves[strategy] = curve
    return {"start_dice_1": start_dice, "curves": curves}


def plot(curves: dict, path: Path) -> None:
    plt = pyplot_agg()
    figure, axes = plt.subplots(figsize=(5, 3.5))
    for strategy, curve in curves.items():
        axes.plot([p["labeled"] for p in curve], [p["dice_1"] for p in curve], marker="o", label=strategy)
    axes.set_xlabel("labeled scans")
    axes.set_ylabel("held-out Dice after one click")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--review-cases", type=int, default=20)
    parser.add_argument("--corrupt-rate", type=float, default=0.5)
    parser.add_argument("--seed-cases", type=int, default=4)
    parser.add_argument("--seed-steps", type=int, default=300, help="steps of the start model, from scratch")
    parser.add_argument("--pool-cases", type=int, default=20)
    parser.add_argument("--test-cases", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--per-round", type=int, default=4)
    parser.add_argument("--steps", type=int, default=150, help="fine-tuning steps per round")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-review", action="store_true", help="annotation rounds only")
    parser.add_argument("--skip-rounds", action="store_true", help="label review only")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "work" / "active_learning")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = {"args": {k: str(v) for k, v in vars(args).items()}}

    if not args.skip_review:
        review = label_review(args.out / "review", args.review_cases, args.corrupt_rate, args.seed)
        results["label_review"] = review
        (args.out / "results.json").write_text(json.dumps(results, indent=1))
        area = "-" if review["auroc"] is None else f"{review['auroc']:.2f}"  # None: one class only
        print(f"label review: {review['cases']} labels, {review['corrupted']} corrupted; AUROC {area}, precision "
              f"top 10% {review['precision_top10']:.2f}, top half {review['precision_top_half']:.2f} "
              f"(recall {review['recall_top_half']:.2f}); {review['seconds']} s scoring")
        for rank, row in enumerate(review["ranking"], start=1):
            print(f"  {rank:2d} {row['id']} score {row['label_noise_score']:.3f} "
                  f"{'CORRUPTED ' + '+'.join(row['operations']) if row['corrupted'] else 'clean'} "
                  f"(label Dice {row['label_dice']:.2f})")

    if not args.skip_rounds:
        rounds = annotation_rounds(args, args.out)
        results["annotation_rounds"] = rounds
        (args.out / "results.json").write_text(json.dumps(results, indent=1))
        plot(rounds["curves"], args.out / "learning_curve.png")
        print("\n| labeled scans | " + " | ".join(STRATEGIES) + " |")
        print("|---|" + "---|" * len(STRATEGIES))
        for index, point in enumerate(rounds["curves"][STRATEGIES[0]]):
            row = [f"{rounds['curves'][s][index]['dice_1']:.3f}" for s in STRATEGIES]
            print(f"| {point['labeled']} | " + " | ".join(row) + " |")
        print(f"\nplot: {args.out / 'learning_curve.png'}; figures: {args.out / 'results.json'}")


if __name__ == "__main__":
    main()
