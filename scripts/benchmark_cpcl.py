"""CPCL ablation: does confidence learning survive noisy labels better than plain training, and does its noise
score find the corrupted labels?

A training cohort of positive 4 mm phantoms (FDG and PSMA) where a share of the labels is low-tier, and the
project's noise injector corrupts a known part of those (`inject_label_noise`, every kind). Four trainings,
all fine-tuning the same start model on the same crops budget:

  (a) plain   plain training on every label, noisy ones included, as if all were expert
  (b) high    plain training on the high-tier labels only
  (c) cpcl-sc CPCL without self-correction (noisy voxels down-weighted, cross-supervision)
  (d) cpcl    full CPCL

each scored on a separate clean test cohort (Dice after 1 and 5 clicks, FPV, FNV), and, for (c) and (d), the
per-case noise score against the injector's records: AUROC and precision among the top 10% (at least one
case). Repeated over ``--seeds`` (cohorts, noise and training all reseeded) to show the run-to-run spread.

    .venv/bin/python scripts/benchmark_cpcl.py [--seeds 0 1] [--train-cases 20] [--low-share 0.4]
        [--corrupt-rate 0.5] [--epochs 4] [--iterations 50] [--init model/segany_pet_small.pt] [--out work/cpcl]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from segany_pet.evaluate.interactive import evaluate_case, summarise
from segany_pet.model import load_checkpoint
from segany_pet.pet import load_nifti, save_nifti
from segany_pet.phantom import generate_case, inject_label_noise
from segany_pet.predictor import Predictor
from segany_pet.train import MODEL_BEST, make_trainer
from segany_pet.train.cpcl import NOISE_REPORT

REPO = Path(__file__).resolve().parents[1]
ARMS = {
    "plain": {"method": "plain", "tiers": "all_high"},
    "high": {"method": "plain", "tiers": "high_only"},
    "cpcl-sc": {"method": "cpcl", "cpcl_self_correction": False},
    "cpcl": {"method": "cpcl"},
}


def write_cohort(folder: Path, cases: int, seed: int, split: int) -> list[str]:
    """Positive 4 mm phantoms, FDG and PSMA alternating: images/, truth/<id>_lesions.nii.gz, truth/<id>.json."""
    for sub in ("images", "truth"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    ids = []
    for index in range(cases):
        tracer = "fdg" if index % 2 == 0 else "psma"
        case_id = f"s{seed}_{split}_{tracer}_{index:03d}"
        if not (folder / "images" / f"{case_id}.nii.gz").exists():
            case_seed = int(np.random.SeedSequence([seed, split, index]).generate_state(1)[0])
            case = generate_case(case_seed, tracer, "4mm", negative=False)
            save_nifti(case.suv, case.affine, folder / "images" / f"{case_id}.nii.gz")
            save_nifti(case.lesions, case.affine, folder / "truth" / f"{case_id}_lesions.nii.gz")
            (folder / "truth" / f"{case_id}.json").write_text(json.dumps(case.info))
        ids.append(case_id)
    return ids


def noisy_labels(folder: Path, ids: list[str], seed: int, low_share: float, corrupt_rate: float) -> dict:
    """Labels for the training cohort: the first ``low_share`` of a seeded shuffle are low-tier, each corrupted
    by the injector with probability ``corrupt_rate``. Returns {id: {"tier", "corrupted", "label_dice"}}."""
    (folder / "labels").mkdir(exist_ok=True)
    rng = np.random.default_rng(seed)
    low = set(rng.permutation(ids)[: round(low_share * len(ids))].tolist())
    records = {}
    for index, case_id in enumerate(ids):
        image = nib.load(folder / "truth" / f"{case_id}_lesions.nii.gz")
        lesions = np.asarray(image.dataobj).astype(np.int32)
        if case_id in low:
            noisy, record = inject_label_noise(lesions, image.header.get_zooms()[:3], seed * 1000 + index,
                                               corrupt_rate)
            records[case_id] = {"tier": "low", "corrupted": bool(record["corrupted"]),
                                "label_dice": record.get("dice", 1.0), "operations": record.get("operations", [])}
        else:
            noisy = (lesions > 0).astype(np.uint8)
            records[case_id] = {"tier": "high", "corrupted": False, "label_dice": 1.0}
        save_nifti(noisy, image.affine, folder / "labels" / f"{case_id}.nii.gz")
    return records


def auroc(scores: list[float], positive: list[bool]) -> float | None:
    """Probability that a corrupted label scores above a clean one (ties count half)."""
    pos = [s for s, p in zip(scores, positive, strict=True) if p]
    neg = [s for s, p in zip(scores, positive, strict=True) if not p]
    if not pos or not neg:
        return None
    wins = sum((a > b) + 0.5 * (a == b) for a in pos for b in neg)
    return wins / (len(pos) * len(neg))


def evaluate(model_path: Path, folder: Path, ids: list[str], clicks: int) -> dict:
    predictor = Predictor(load_checkpoint(model_path), cache_size=4)
    results = []
    for case_id in ids:
        volume = load_nifti(folder / "images" / f"{case_id}.nii.gz")
        truth = np.asarray(nib.load(folder / "truth" / f"{case_id}_lesions.nii.gz").dataobj).astype(np.int32)
        info = json.loads((folder / "truth" / f"{case_id}.json").read_text())
        touches = {lesion["id"]: lesion["touches"] for lesion in info["lesions"]}
        results.append(evaluate_case(predictor, volume, truth, clicks, touches=touches, volume_id=case_id))
        predictor.clear_cache()
    summary = summarise(results)
    curve = summary["model"]["all"]["dice_curve"]
    return {"dice_1": curve[0], f"dice_{clicks}": curve[-1], "fpv_ml": summary["model_case"]["fpv_ml"],
            "fnv_ml": summary["model_case"]["fnv_ml"], "lesions": summary["lesions"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--train-cases", type=int, default=20)
    parser.add_argument("--test-cases", type=int, default=6)
    parser.add_argument("--low-share", type=float, default=0.4, help="share of training labels that are low-tier")
    parser.add_argument("--corrupt-rate", type=float, default=0.5, help="share of low-tier labels corrupted")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--iterations", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--clicks", type=int, default=5)
    parser.add_argument("--init", type=Path, default=REPO / "model" / "segany_pet_small.pt",
                        help="start model (all arms): fine-tuning shows what noisy labels do to a working model")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--out", type=Path, default=REPO / "work" / "cpcl")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    results = []
    for seed in args.seeds:
        folder = args.out / f"seed{seed}"
        train_ids = write_cohort(folder / "train", args.train_cases, seed, 0)
        test_ids = write_cohort(folder / "test", args.test_cases, seed, 1)
        labels = noisy_labels(folder / "train", train_ids, seed, args.low_share, args.corrupt_rate)
        corrupted = sum(r["corrupted"] for r in labels.values())
        low = sum(r["tier"] == "low" for r in labels.values())
        print(f"seed {seed}: {len(train_ids)} training labels, {low} low-tier, {corrupted} corrupted; "
              f"{len(test_ids)} clean test cases", flush=True)
        baseline = evaluate(args.init, folder / "test", test_ids, args.clicks)
        results.append({"seed": seed, "arm": "start model", **baseline})
        for arm in args.arms:
            settings = dict(ARMS[arm])
            tiers = settings.pop("tiers", None)
            records = []
            for case_id in train_ids:
                tier = labels[case_id]["tier"]
                if tiers == "high_only" and tier == "low":
                    continue
                records.append({"id": case_id, "image": str(folder / "train" / "images" / f"{case_id}.nii.gz"),
                                "label": str(folder / "train" / "labels" / f"{case_id}.nii.gz"),
                                "tier": "high" if tiers == "all_high" else tier})
            run = folder / f"run_{arm}"
            config = {"output_dir": str(run), "init_checkpoint": str(args.init), "epochs": args.epochs,
                      "iterations_per_epoch": args.iterations, "batch_size": args.batch_size, "lr": args.lr,
                      "warmup_iterations": 10, "val_cases": 0, "seed": seed, "threads": args.threads,
                      "progress_bar": False, "cpcl_warmup_epochs": 1, **settings}
            started = time.perf_counter()
            make_trainer(config, records).run()
            seconds = time.perf_counter() - started
            row = {"seed": seed, "arm": arm, "train_seconds": round(seconds),
                   **evaluate(run / MODEL_BEST, folder / "test", test_ids, args.clicks)}
            report = run / NOISE_REPORT
            if report.exists():
                cases = json.loads(report.read_text())["cases"]
                scores = [c["noise_score"] for c in cases]
                flags = [labels[c["id"]]["corrupted"] for c in cases]
                top = max(1, round(0.1 * len(cases)))
                row["noise_auroc"] = auroc(scores, flags)
                row["precision_top10"] = sum(flags[:top]) / top
                row["noise_ranking"] = [(c["id"], c["noise_score"], labels[c["id"]]["corrupted"]) for c in cases]
            results.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "noise_ranking"}), flush=True)
        (args.out / "results.json").write_text(json.dumps(results, indent=1))

    print("\n| arm | Dice 1 click | Dice 5 clicks | FPV mL | FNV mL | noise AUROC | precision top 10% | train s |")
    print("|---|---|---|---|---|---|---|---|")
    for arm in ["start model", *args.arms]:
        rows = [r for r in results if r["arm"] == arm]

        def spread(key, rows=rows, digits=3):
            values = [r[key] for r in rows if r.get(key) is not None]
            if not values:
                return "-"
            mean = statistics.mean(values)
            return f"{mean:.{digits}f}" + (f" ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else "")

        print(f"| {arm} | {spread('dice_1')} | {spread(f'dice_{args.clicks}')} | {spread('fpv_ml')} | "
              f"{spread('fnv_ml')} | {spread('noise_auroc')} | {spread('precision_top10')} | "
              f"{spread('train_seconds', digits=0)} |")
    print(f"\nseeds {args.seeds}; mean ± standard deviation over seeds; results in {args.out / 'results.json'}")


if __name__ == "__main__":
    main()
