"""Active learning, measured: does ``label_noise_score`` find corrupted labels, and does annotating in the order a
strategy serves raise held-out Dice faster than annotating in random order?

1. Label review (``--review-seeds``, one cohort each). ``--review-cases`` labeled 4 mm phantoms (FDG and PSMA);
   the project's noise injector corrupts each label with probability ``--corrupt-rate`` (every kind, records
   kept). Every scan is scored as ``POST /scoring/cross_prompt`` scores it (`score_image`: the shipped model
   prompted by points and by boxes, organ uptake left out by the hot-spot classifier). Printed per cohort: the
   AUROC of ``label_noise_score`` against the injector's records, overall and per corruption kind (the labels
   corrupted by that kind against the clean ones), and the precision among the top 10%.
2. Annotation rounds (``--seeds``). The annotation loop the server runs with ``{"fast": true}``: the shipped
   model's image encoder, frozen; its prompt encoder and mask decoder re-initialised and trained by the fast
   loop (`FastTrainer`) on ``--seed-cases`` labeled phantoms (the start model), so that labels have something
   to teach. A pool of ``--pool-cases`` unlabeled phantoms, ``--test-cases`` clean test phantoms. Each round,
   each arm takes ``--per-round`` scans from its pool, receives their true labels and fine-tunes its own model
   ``--steps`` fast steps on all its labels (same seeds for all arms). Arms:

     random                 a seeded random draw
     foreground             random draws weighted by each scan's candidate uptake (mL of the 41% regions of its
                            hot spots the classifier calls lesions): nnActive's foreground-aware baseline
     epistemic              the largest mean voxel variance over 8 decodes with dropout (p 0.1) on the image
                            embedding, clicked at each lesion-like hot spot (Monte Carlo dropout, as MONAI Label's
                            epistemic scoring, on the decoder: the encoder has no dropout and is frozen)
     disagreement           the order of the ``disagreement`` strategy (`annotation_priority`)
     disagreement_diverse   the order of ``disagreement_diverse`` (`diverse_priority`: disagreement times the
                            distance to the nearest labeled or already chosen scan)

   After every round: Dice after 1 and after 5 clicks on the test phantoms (the interactive benchmark's
   protocol, at the preset's spacing alone). Printed per arm: the curve (mean +- sd over seeds), the area under
   it, its paired difference to random with a 95% interval (t over seeds) and the labeled scans needed to
   reach random's final Dice. Plotted to ``OUT/learning_curves.png``; every figure in ``OUT/results.json``,
   written after every round (a cut-off run keeps what it measured).

The encoder never changes, so the embeddings of every crop are computed once per seed and kept (Predictor
caches keyed by scan and crop) while each model's decoder weights are swapped in.

    .venv/bin/python scripts/benchmark_active_learning.py [--seeds 0 1 2] [--review-seeds 0 1 2]
        [--pool-cases 40] [--test-cases 10] [--rounds 4] [--per-round 3] [--steps 60] [--out work/active]
        [--merge OTHER/results.json ...]

Seeds run side by side as separate processes (``--threads 1``, their own ``--out``), and one of them, or a
run with ``--seeds`` and ``--review-seeds`` empty, merges the others' results.json into one summary.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from benchmark_cpcl import SharedEncoder, auroc, interval, noisy_labels, write_cohort

from segany_pet.active.cross_prompt import TOP_TARGETS, scan_targets, score_scan
from segany_pet.active.scoring import (
    annotation_priority,
    diverse_priority,
    score_image,
    scoring_predictor,
)
from segany_pet.evaluate.interactive import evaluate_case
from segany_pet.evaluate.report import summarise
from segany_pet.model import load_checkpoint
from segany_pet.model.checkpoint import save_checkpoint
from segany_pet.pet import load_nifti
from segany_pet.phantom.label_noise import NOISE_KINDS
from segany_pet.report import pyplot_agg
from segany_pet.segment.threshold import regions_from_clicks
from segany_pet.train import MODEL_BEST
from segany_pet.train.fast import FastTrainer, fresh_decoder

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "model" / "segany_pet_small.pt"
ARMS = ("random", "foreground", "epistemic", "disagreement", "disagreement_diverse")
DROPOUT, DROPOUT_SAMPLES = 0.1, 8


# ----------------------------------------------------------------------------------------------
# Part 1: label review


def label_review(folder: Path, cases: int, corrupt_rate: float, seed: int) -> dict:
    """Rank every label of one cohort by ``label_noise_score`` and compare with the injector's records."""
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
                     "operations": [op["kind"] for op in record["operations"]], "targets": scores["targets"]})
    rows.sort(key=lambda r: r["label_noise_score"], reverse=True)
    flags = [r["corrupted"] for r in rows]
    top10 = max(1, round(0.1 * len(rows)))
    clean = [r["label_noise_score"] for r in rows if not r["corrupted"]]
    by_kind = {}
    for kind in NOISE_KINDS:
        hit = [r["label_noise_score"] for r in rows if kind in r["operations"]]
        if hit:
            by_kind[kind] = {"labels": len(hit), "auroc": auroc(hit + clean, [True] * len(hit) + [False] * len(clean))}
    return {"seed": seed, "cases": len(rows), "corrupted": sum(flags), "seconds": round(time.perf_counter() - started),
            "auroc": auroc([r["label_noise_score"] for r in rows], flags),
            "precision_top10": sum(flags[:top10]) / top10, "by_kind": by_kind, "ranking": rows}


# ----------------------------------------------------------------------------------------------
# Part 2: annotation rounds


class Scans:
    """One split's scans: volumes, truth and records, read once."""

    def __init__(self, folder: Path, ids: list[str]):
        self.folder, self.ids = folder, ids
        self.volumes = {i: load_nifti(folder / "images" / f"{i}.nii.gz") for i in ids}

    def record(self, case_id: str) -> dict:
        return {"id": case_id, "image": str(self.folder / "images" / f"{case_id}.nii.gz"),
                "label": str(self.folder / "labels" / f"{case_id}.nii.gz"), "tier": "high"}

    def truth(self, case_id: str) -> np.ndarray:
        return np.asarray(nib.load(self.folder / "truth" / f"{case_id}_lesions.nii.gz").dataobj).astype(np.int32)


def start_model(path: Path, seed: int) -> Path:
    """The shipped model's encoders with a freshly initialised prompt encoder and mask decoder."""
    save_checkpoint(fresh_decoder(load_checkpoint(MODEL), seed), path)
    return path


def train(run: Path, init: Path, records: list[dict], steps: int, lr: float, seed: int, store: dict, args) -> Path:
    config = {"output_dir": str(run), "init_checkpoint": str(init), "epochs": 1, "iterations_per_epoch": steps,
              "batch_size": args.batch_size, "lr": lr, "warmup_iterations": 10, "val_cases": 0, "seed": seed,
              "threads": args.threads, "progress_bar": False, "fast": True, "resume": False,
              "fast_crops_per_object": args.crops_per_object}
    FastTrainer(config, records, crop_store=store).run()
    (run / "checkpoint_last.pt").unlink(missing_ok=True)  # 3x the model's size, and never resumed here
    return run / MODEL_BEST


def evaluate(shared: SharedEncoder, test: Scans, clicks: int) -> dict:
    results = []
    for case_id in test.ids:
        info = json.loads((test.folder / "truth" / f"{case_id}.json").read_text())
        touches = {lesion["id"]: lesion["touches"] for lesion in info["lesions"]}
        results.append(evaluate_case(shared.testing, test.volumes[case_id], test.truth(case_id), clicks,
                                     touches=touches, volume_id=case_id))
    curve = summarise(results)["model"]["all"]["dice_curve"]
    return {"dice_1": round(curve[0], 4), "dice_5": round(curve[-1], 4)}


def epistemic_score(shared: SharedEncoder, volume, case_id: str, plan) -> float:
    """Mean over the TOP_TARGETS most uncertain lesion-like targets of the voxel variance of the probability
    under embedding dropout, over the voxels the mean calls object or is unsure of (mean > 0.1)."""
    session = shared.scoring.set_volume(volume, case_id)
    generator = torch.Generator().manual_seed(0)
    values = []
    for target in plan.targets:
        prediction = session.predict(foreground=[target.click])
        embedding, _ = shared.scoring.embedding(session, prediction.geometry)
        click = prediction.geometry.stored_to_crop(volume.affine, [target.click])
        points = (torch.as_tensor(click, dtype=torch.float32)[None], torch.ones(1, 1, dtype=torch.int64))
        with torch.no_grad():
            sparse, dense = shared.model.prompt_encoder(points=points, boxes=None, masks=None)
            probabilities = []
            for _ in range(DROPOUT_SAMPLES):
                mask = (torch.rand(embedding.shape, generator=generator) >= DROPOUT).float() / (1 - DROPOUT)
                logits, _ = shared.model.mask_decoder(embedding * mask, shared.model.prompt_encoder.get_dense_pe(),
                                                      sparse, dense, False)
                probabilities.append(torch.sigmoid(logits))
        stack = torch.stack(probabilities)
        where = stack.mean(dim=0) > 0.1
        values.append(float(stack.var(dim=0)[where].mean()) if where.any() else 0.0)
    return float(np.mean(sorted(values, reverse=True)[:TOP_TARGETS])) if values else 0.0


def foreground_weight(volume, plan) -> float:
    """mL of the 41% regions of the scan's lesion-like hot spots."""
    spots = [t.click for t in plan.targets]
    if not spots:
        return 0.0
    voxels = sum(region.voxels for region in regions_from_clicks(volume.suv, volume.spacing, spots))
    return voxels * float(np.prod(volume.spacing)) / 1000.0


def choose(arm: str, remaining: list[str], k: int, rng, shared, pool: Scans, plans: dict, weights: dict,
           taken_features: list) -> tuple[list[str], dict]:
    """The arm's next ``k`` scans and the scores it ranked by; ``taken_features`` (the labeled scans'
    descriptors, for ``disagreement_diverse``) grows by the chosen scans'."""
    if arm == "random":
        return [str(i) for i in rng.choice(remaining, k, replace=False)], {}
    if arm == "foreground":
        w = np.array([weights[i] for i in remaining]) + 1e-3
        return [str(i) for i in rng.choice(remaining, k, replace=False, p=w / w.sum())], {}
    if arm == "epistemic":
        scores = {i: epistemic_score(shared, pool.volumes[i], i, plans[i]) for i in remaining}
        return sorted(remaining, key=lambda i: scores[i], reverse=True)[:k], scores
    infos = {}
    for case_id in remaining:
        session = shared.scoring.set_volume(pool.volumes[case_id], case_id)
        infos[case_id] = score_scan(session, session, targets=plans[case_id])
    if arm == "disagreement":
        order = sorted(remaining, key=lambda i: annotation_priority(infos[i], False), reverse=True)
        return order[:k], {i: infos[i]["cross_prompt_disagreement"] for i in remaining}
    chosen = []
    for _ in range(k):
        best = max((i for i in remaining if i not in chosen),
                   key=lambda i: diverse_priority(infos[i], False, taken_features))
        chosen.append(best)
        if infos[best]["cross_prompt_features"] is not None:
            taken_features.append(infos[best]["cross_prompt_features"])
    return chosen, {i: infos[i]["cross_prompt_disagreement"] for i in remaining}


def annotation_rounds(args, seed: int, results: dict, save) -> dict:
    folder = args.out / f"seed{seed}"
    splits = {}
    for name, count, split in (("seed", args.seed_cases, 20), ("pool", args.pool_cases, 21),
                               ("test", args.test_cases, 22)):
        ids = write_cohort(folder / name, count, seed, split)
        if name != "test":
            noisy_labels(folder / name, ids, seed, low_share=0.0, corrupt_rate=0.0)  # true labels, binary
        splits[name] = Scans(folder / name, ids)
    seed_scans, pool, test = splits["seed"], splits["pool"], splits["test"]
    store: dict = {}
    started = time.perf_counter()
    init = start_model(folder / "start_init.pt", seed)
    start = train(folder / "run_start", init, [seed_scans.record(i) for i in seed_scans.ids], args.start_steps,
                  args.start_lr, seed, store, args)
    shared = SharedEncoder(start, scoring=True)
    plans = {i: scan_targets(pool.volumes[i]) for i in pool.ids}
    weights = {i: foreground_weight(pool.volumes[i], plans[i]) for i in pool.ids}
    seed_features = []
    for case_id in seed_scans.ids:
        session = shared.scoring.set_volume(seed_scans.volumes[case_id], case_id)
        features = score_scan(session, session)["cross_prompt_features"]
        if features is not None:
            seed_features.append(features)
    round0 = {"round": 0, "labeled": len(seed_scans.ids), **evaluate(shared, test, 5), "chosen": []}
    print(f"seed {seed}: start model ({args.start_steps} fast steps on {len(seed_scans.ids)} phantoms) "
          f"Dice 1 / 5 clicks {round0['dice_1']:.3f} / {round0['dice_5']:.3f}; set-up "
          f"{time.perf_counter() - started:.0f} s", flush=True)
    curves = results.setdefault("rounds", {}).setdefault(str(seed), {})
    for arm_index, arm in enumerate(ARMS):
        rng = np.random.default_rng([seed, arm_index])
        model, labeled, remaining = start, list(seed_scans.ids), list(pool.ids)
        taken = list(seed_features)
        curve = [dict(round0)]
        for round_index in range(1, args.rounds + 1):
            began = time.perf_counter()
            shared.use(model)
            chosen, scores = choose(arm, remaining, args.per_round, rng, shared, pool, plans, weights, taken)
            choose_seconds = time.perf_counter() - began
            remaining = [i for i in remaining if i not in chosen]
            labeled += chosen
            records = [seed_scans.record(i) for i in seed_scans.ids] + [pool.record(i) for i in labeled
                                                                         if i in pool.volumes]
            model = train(folder / f"run_{arm}_{round_index}", model, records, args.steps, args.lr, seed, store, args)
            shared.use(model)
            point = {"round": round_index, "labeled": len(labeled), **evaluate(shared, test, 5), "chosen": chosen,
                     "choose_seconds": round(choose_seconds, 1), "seconds": round(time.perf_counter() - began, 1),
                     "tracers": sorted(c.split("_")[2] for c in chosen)}
            curve.append(point)
            curves[arm] = curve
            save()
            print(f"seed {seed} {arm:21s} round {round_index}: {point['labeled']} labeled, Dice 1 / 5 clicks "
                  f"{point['dice_1']:.3f} / {point['dice_5']:.3f} ({point['seconds']:.0f} s; chose "
                  f"{', '.join(chosen)})", flush=True)
    return curves


# ----------------------------------------------------------------------------------------------
# Summary


def area(curve: list[dict], key: str) -> float:
    """Mean Dice over the labeled-scan axis (trapezoid, normalised to the axis' span)."""
    x = np.array([p["labeled"] for p in curve], dtype=float)
    y = np.array([p[key] for p in curve], dtype=float)
    return float(np.sum((y[1:] + y[:-1]) / 2 * np.diff(x)) / (x[-1] - x[0]))


def needed(curve: list[dict], target: float, key: str) -> int | None:
    """Labeled scans at the first round whose Dice reaches ``target`` (None: never)."""
    return next((p["labeled"] for p in curve if p[key] >= target - 1e-9), None)


def summarise_rounds(rounds: dict) -> dict:
    seeds = [s for s in rounds if all(a in rounds[s] for a in ARMS)
             and len({len(rounds[s][a]) for a in ARMS}) == 1]
    summary = {"seeds": seeds, "arms": {}}
    if not seeds:
        return summary
    for arm in ARMS:
        row = {}
        for key in ("dice_1", "dice_5"):
            curves = [rounds[s][arm] for s in seeds]
            per_round = list(zip(*[[p[key] for p in c] for c in curves], strict=True))
            areas = [area(c, key) for c in curves]
            differences = [area(rounds[s][arm], key) - area(rounds[s]["random"], key) for s in seeds]
            reach = [needed(rounds[s][arm], rounds[s]["random"][-1][key], key) for s in seeds]
            row[key] = {
                "labeled": [p["labeled"] for p in curves[0]],
                "mean": [round(float(np.mean(v)), 4) for v in per_round],
                "sd": [round(float(np.std(v, ddof=1)), 4) if len(v) > 1 else 0.0 for v in per_round],
                "area": [round(a, 4) for a in areas],
                "area_minus_random": [round(d, 4) for d in differences],
                "area_minus_random_ci": [round(v, 4) for v in interval(differences)],
                "scans_to_random_final": reach,
            }
        summary["arms"][arm] = row
    return summary


def plot(summary: dict, path: Path) -> None:
    plt = pyplot_agg()
    figure, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for panel, key in zip(axes, ("dice_1", "dice_5"), strict=True):
        for arm, row in summary["arms"].items():
            x, mean, sd = np.array(row[key]["labeled"]), np.array(row[key]["mean"]), np.array(row[key]["sd"])
            panel.plot(x, mean, marker="o", label=arm)
            panel.fill_between(x, mean - sd, mean + sd, alpha=0.15)
        panel.set_xlabel("labeled scans")
        panel.set_ylabel(f"held-out Dice after {key[-1]} click{'s' if key != 'dice_1' else ''}")
        panel.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.suptitle(f"annotation order, mean +- sd over seeds {', '.join(summary['seeds'])}")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def print_summary(summary: dict) -> None:
    for key in ("dice_1", "dice_5"):
        print(f"\n{key}: mean +- sd over seeds {', '.join(summary['seeds'])}")
        labeled = next(iter(summary["arms"].values()))[key]["labeled"]
        print("| arm | " + " | ".join(str(n) for n in labeled) + " | area | area - random (95% CI) | scans to "
              "random's final |")
        print("|---|" + "---|" * (len(labeled) + 3))
        for arm, row in summary["arms"].items():
            r = row[key]
            cells = [f"{m:.3f} +- {s:.3f}" for m, s in zip(r["mean"], r["sd"], strict=True)]
            mean, low, high = r["area_minus_random_ci"]
            print(f"| {arm} | " + " | ".join(cells) + f" | {np.mean(r['area']):.3f} | {mean:+.3f} ({low:+.3f}, "
                  f"{high:+.3f}) | {r['scans_to_random_final']} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--review-seeds", type=int, nargs="*", default=[0, 1, 2])
    parser.add_argument("--review-cases", type=int, default=40)
    parser.add_argument("--corrupt-rate", type=float, default=0.5)
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    parser.add_argument("--seed-cases", type=int, default=4)
    parser.add_argument("--pool-cases", type=int, default=40)
    parser.add_argument("--test-cases", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--per-round", type=int, default=3)
    parser.add_argument("--start-steps", type=int, default=200, help="fast steps of the start model")
    parser.add_argument("--start-lr", type=float, default=1e-3)
    parser.add_argument("--steps", type=int, default=60, help="fast steps per round")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--crops-per-object", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "work" / "active")
    parser.add_argument("--merge", type=Path, nargs="*", default=[],
                        help="results.json files of runs over other seeds (e.g. run side by side) to summarise with")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    path = args.out / "results.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    results["args"] = {k: str(v) for k, v in vars(args).items()}

    def save():
        if results.get("rounds"):
            results["summary"] = summarise_rounds(results["rounds"])
        path.write_text(json.dumps(results, indent=1))

    for seed in args.review_seeds:
        review = label_review(args.out / f"review{seed}", args.review_cases, args.corrupt_rate, seed)
        results.setdefault("label_review", {})[str(seed)] = review
        save()
        kinds = ", ".join(f"{k} {v['auroc']:.2f} ({v['labels']})" for k, v in review["by_kind"].items())
        print(f"label review, cohort {seed}: {review['cases']} labels, {review['corrupted']} corrupted; AUROC "
              f"{review['auroc']:.3f}; precision top 10% {review['precision_top10']:.2f}; by kind: {kinds}; "
              f"{review['seconds']} s", flush=True)
    for seed in args.seeds:
        annotation_rounds(args, seed, results, save)
    for other in args.merge:
        merged = json.loads(other.read_text())
        for part in ("label_review", "rounds"):
            results.setdefault(part, {}).update(merged.get(part, {}))
    if args.merge:
        save()
    if results.get("rounds"):
        save()
        summary = results["summary"]
        if summary["seeds"]:
            print_summary(summary)
            plot(summary, args.out / "learning_curves.png")
            print(f"\nplot: {args.out / 'learning_curves.png'}; figures: {path}")


if __name__ == "__main__":
    main()
