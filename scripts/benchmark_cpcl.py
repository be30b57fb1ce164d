"""CPCL ablation: does confidence learning survive noisy labels better than plain training, and does its noise
score find the corrupted labels?

A training cohort of positive 4 mm phantoms (FDG and PSMA) where most labels (``--low-share``) are low-tier and
the project's noise injector corrupts most of those (``--corrupt-rate``) with every kind it has, the quick
threshold labeller's mistakes included (41%-of-SUVmax outlines that bleed into uptake or stop short, organ
uptake labelled as lesion: `inject_label_noise` given the SUV image). Every arm trains the same start: the
shipped model's image encoder, frozen, with its prompt encoder and mask decoder freshly initialised (so the
labels, not the shipped weights, decide what the decoder learns), in the fast loop (`train/fast.py`: crops
encoded once, the decoders trained on the cached embeddings), for the same steps:

  (a) plain   plain training on every label, noisy ones included, as if all were expert
  (b) high    plain training on the high-tier labels only
  (c) cpcl-sc CPCL without self-correction (noisy voxels down-weighted, cross-supervision)
  (d) cpcl    full CPCL (the box replica starts from its own freshly initialised decoder)
  (e) clean   plain training on the true labels of every case: the ceiling
  cpcl-warm2  full CPCL warmed up two epochs of three instead of one (replicas that know more before
              their consensus corrects labels)
  cpcl-strict full CPCL correcting only where the replicas' mean is certain to 0.1 bits (beyond 0.013 / 0.987)

each scored on a separate clean test cohort (Dice after 1 and 5 clicks, FPV, FNV), and, for (c) and (d), the
per-case noise score against the injector's records: AUROC and precision among the top 10%. Seeds reseed the
cohorts, the noise, the start decoders and the training. Printed: mean +- sd over seeds per arm, the paired
difference of (d) to (b) and (e) and of every CPCL arm to (a) with a 95% interval (t over seeds), and how CPCL's
corrected labels compare with the truth. Every figure in ``OUT/results.json``, written after every arm (training
seconds per arm too: comparable only between arms that ran under the same load; scripts/benchmark_fast_training.py
measures the step cost side by side).

    .venv/bin/python scripts/benchmark_cpcl.py [--seeds 0 1 2] [--train-cases 16] [--low-share 0.75]
        [--corrupt-rate 0.8] [--steps 180] [--out work/cpcl] [--merge OTHER/results.json ...]

Seeds run side by side as separate processes (``--threads 1``, their own ``--out``); a run with ``--seeds``
empty merges their results.json into one summary and plot.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from segany_pet.evaluate.interactive import evaluate_case
from segany_pet.evaluate.report import summarise
from segany_pet.model import load_checkpoint
from segany_pet.model.checkpoint import save_checkpoint
from segany_pet.pet import load_nifti, save_nifti
from segany_pet.phantom import generate_case, inject_label_noise
from segany_pet.predictor import Predictor
from segany_pet.report import pyplot_agg
from segany_pet.train import MODEL_BEST, TRAIN_STATS, make_trainer
from segany_pet.train.cpcl import CORRECTED_DIR, NOISE_REPORT
from segany_pet.train.fast import FROZEN, fresh_decoder

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "model" / "segany_pet_small.pt"
ARMS = {
    "plain": {"method": "plain", "labels": "noisy", "tiers": "all_high"},
    "high": {"method": "plain", "labels": "noisy", "tiers": "high_only"},
    "cpcl-sc": {"method": "cpcl", "labels": "noisy", "cpcl_self_correction": False},
    "cpcl": {"method": "cpcl", "labels": "noisy"},
    "cpcl-warm2": {"method": "cpcl", "labels": "noisy", "cpcl_warmup_epochs": 2},
    "cpcl-strict": {"method": "cpcl", "labels": "noisy", "cpcl_uncertainty_threshold": 0.1},
    "clean": {"method": "plain", "labels": "truth", "tiers": "all_high"},
}
VARIANTS = ("cpcl-warm2", "cpcl-strict")  # not run by default
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


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


def noisy_labels(folder: Path, ids: list[str], seed: int, low_share: float, corrupt_rate: float,
                 image_kinds: bool = False) -> dict:
    """Labels for the training cohort: the first ``low_share`` of a seeded shuffle are low-tier, each corrupted
    by the injector with probability ``corrupt_rate`` (``image_kinds``: given the SUV image, so the threshold
    labeller's kinds too). Returns {id: {"tier", "corrupted", "label_dice", "operations"}}."""
    (folder / "labels").mkdir(exist_ok=True)
    rng = np.random.default_rng(seed)
    low = set(rng.permutation(ids)[: round(low_share * len(ids))].tolist())
    records = {}
    for index, case_id in enumerate(ids):
        image = nib.load(folder / "truth" / f"{case_id}_lesions.nii.gz")
        lesions = np.asarray(image.dataobj).astype(np.int32)
        if case_id in low:
            suv = np.asarray(nib.load(folder / "images" / f"{case_id}.nii.gz").dataobj, dtype=np.float32) \
                if image_kinds else None
            noisy, record = inject_label_noise(lesions, image.header.get_zooms()[:3], seed * 1000 + index,
                                               corrupt_rate, suv=suv)
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


def interval(values: list[float]) -> tuple[float, float, float]:
    """Mean and its 95% interval (t over the values: seeds)."""
    mean = float(np.mean(values))
    if len(values) < 2:
        return mean, float("nan"), float("nan")
    half = T_975.get(len(values) - 1, 1.96) * statistics.stdev(values) / len(values) ** 0.5
    return mean, mean - half, mean + half


class SharedEncoder:
    """One model whose encoder stays the start model's; each trained model's decoder weights are loaded into it
    in turn, so the Predictors' embedding caches stay valid across arms and rounds."""

    def __init__(self, start: Path, scoring: bool = False):
        self.model = load_checkpoint(start)
        self.frozen = self._fingerprint()
        # Two windows per object at most, as the trainer's validation: an early decoder following a blob across
        # the body would cost the run more than the figure gains.
        self.testing = Predictor(self.model, cache_size=100_000, max_windows=2, scale_ensemble=False)
        self.scoring = Predictor(self.model, cache_size=100_000, max_windows=1, scale_ensemble=False) \
            if scoring else None

    def _fingerprint(self) -> str:
        digest = hashlib.sha256()
        for name, tensor in self.model.state_dict().items():
            if name.split(".")[0] in FROZEN:
                digest.update(tensor.numpy().tobytes())
        return digest.hexdigest()

    def use(self, model_file: Path) -> None:
        self.model.load_state_dict(load_checkpoint(model_file).state_dict())
        if self._fingerprint() != self.frozen:
            raise RuntimeError(f"{model_file} changed the frozen encoder: the cached embeddings would be stale")
        self.model.eval()

    def evaluate(self, folder: Path, ids: list[str], volumes: dict) -> dict:
        """Dice after 1 and 5 clicks (the interactive benchmark's protocol), FPV and FNV, on clean test cases."""
        results = []
        for case_id in ids:
            truth = np.asarray(nib.load(folder / "truth" / f"{case_id}_lesions.nii.gz").dataobj).astype(np.int32)
            info = json.loads((folder / "truth" / f"{case_id}.json").read_text())
            touches = {lesion["id"]: lesion["touches"] for lesion in info["lesions"]}
            results.append(evaluate_case(self.testing, volumes[case_id], truth, 5, touches=touches,
                                         volume_id=case_id))
        summary = summarise(results)
        curve = summary["model"]["all"]["dice_curve"]
        case = summary["model_case"]
        return {"dice_1": round(curve[0], 4), "dice_5": round(curve[-1], 4), "fpv_ml": round(case["fpv_ml"], 3),
                "fnv_ml": round(case["fnv_ml"], 3)}


def start_models(folder: Path, seed: int) -> tuple[Path, Path]:
    """The shipped encoder with fresh decoders: one for the point replica (and the plain arms), one for CPCL's
    box replica."""
    shipped = load_checkpoint(MODEL)
    paths = folder / "start_point.pt", folder / "start_box.pt"
    for offset, path in enumerate(paths):
        save_checkpoint(fresh_decoder(shipped, 1000 * seed + offset), path)
    return paths


def correction_quality(run: Path, folder: Path, low: list[str]) -> dict:
    """How CPCL's corrected low-tier labels compare with the truth, against the noisy labels it was given (mean
    Dice over the low-tier cases), the voxels it added and removed, and the share of label-or-consensus voxels
    it found certain-noisy while training (`confidence_targets`' corrected voxels)."""
    def dice(a, b):
        return 2.0 * int((a & b).sum()) / max(int(a.sum()) + int(b.sum()), 1)

    noisy_dice, corrected_dice, added, removed = [], [], 0, 0
    for case_id in low:
        truth = np.asarray(nib.load(folder / "truth" / f"{case_id}_lesions.nii.gz").dataobj) > 0
        noisy = np.asarray(nib.load(folder / "labels" / f"{case_id}.nii.gz").dataobj) > 0
        corrected = np.asarray(nib.load(run / CORRECTED_DIR / f"{case_id}.nii.gz").dataobj) > 0
        noisy_dice.append(dice(noisy, truth))
        corrected_dice.append(dice(corrected, truth))
        added += int((corrected & ~noisy).sum())
        removed += int((noisy & ~corrected).sum())
    seen = json.loads((run / TRAIN_STATS).read_text())["cpcl"]["low_tier_crops_seen"].values()
    return {"noisy_label_dice": round(float(np.mean(noisy_dice)), 4),
            "corrected_label_dice": round(float(np.mean(corrected_dice)), 4),
            "voxels_added": added, "voxels_removed": removed,
            "certain_noisy_share": round(float(np.mean([v["corrected_voxels"] / max(v["union_voxels"], 1)
                                                        for v in seen])), 4)}


def run_seed(args, seed: int, results: list, save) -> None:
    folder = args.out / f"seed{seed}"
    train_ids = write_cohort(folder / "train", args.train_cases, seed, 0)
    test_ids = write_cohort(folder / "test", args.test_cases, seed, 1)
    labels = noisy_labels(folder / "train", train_ids, seed, args.low_share, args.corrupt_rate, image_kinds=True)
    low = [i for i in train_ids if labels[i]["tier"] == "low"]
    corrupted = [i for i in low if labels[i]["corrupted"]]
    kinds = sorted({op["kind"] for i in corrupted for op in labels[i]["operations"]})
    label_dice = statistics.mean(labels[i]["label_dice"] for i in low)
    print(f"seed {seed}: {len(train_ids)} training labels, {len(low)} low-tier, {len(corrupted)} corrupted "
          f"(kinds: {', '.join(kinds)}; low-tier label Dice {label_dice:.3f}); {len(test_ids)} clean test cases",
          flush=True)
    (folder / "train" / "clean").mkdir(exist_ok=True)
    for case_id in train_ids:  # the true labels, binary as the noisy ones
        image = nib.load(folder / "train" / "truth" / f"{case_id}_lesions.nii.gz")
        save_nifti((np.asarray(image.dataobj) > 0).astype(np.uint8), image.affine,
                   folder / "train" / "clean" / f"{case_id}.nii.gz")
    point_start, box_start = start_models(folder, seed)
    shared = SharedEncoder(point_start)
    volumes = {i: load_nifti(folder / "test" / "images" / f"{i}.nii.gz") for i in test_ids}
    store: dict = {}  # crops encoded once per label set, shared by the arms
    for arm in args.arms:
        settings = dict(ARMS[arm])
        tiers, label_dir = settings.pop("tiers", None), settings.pop("labels")
        records = []
        for case_id in train_ids:
            tier = labels[case_id]["tier"]
            if tiers == "high_only" and tier == "low":
                continue
            label = folder / "train" / ("labels" if label_dir == "noisy" else "clean") / f"{case_id}.nii.gz"
            records.append({"id": case_id, "image": str(folder / "train" / "images" / f"{case_id}.nii.gz"),
                            "label": str(label), "tier": "high" if tiers == "all_high" else tier})
        run = folder / f"run_{arm}"
        epochs = 3  # CPCL warms up on the first (cpcl-warm2: two); the plain arms train the same steps
        config = {"output_dir": str(run), "init_checkpoint": str(point_start), "epochs": epochs,
                  "iterations_per_epoch": args.steps // epochs, "batch_size": args.batch_size, "lr": args.lr,
                  "warmup_iterations": 10, "val_cases": 0, "seed": seed, "threads": args.threads,
                  "progress_bar": False, "resume": False, "fast": True, "fast_crops_per_object": args.crops_per_object,
                  "cpcl_warmup_epochs": 1, **settings}
        if settings["method"] == "cpcl":
            config["cpcl_box_checkpoint"] = str(box_start)
        started = time.perf_counter()
        make_trainer(config, records, crop_store=store).run()
        seconds = time.perf_counter() - started
        stats = json.loads((run / TRAIN_STATS).read_text())
        (run / "checkpoint_last.pt").unlink(missing_ok=True)  # 3x the model's size, and never resumed here
        shared.use(run / MODEL_BEST)
        row = {"seed": seed, "arm": arm, "train_seconds": round(seconds, 1),
               "seconds_per_step": stats["seconds_per_iteration"],
               "encode_seconds": stats.get("fast", {}).get("encode_seconds"),
               **shared.evaluate(folder / "test", test_ids, volumes)}
        report = run / NOISE_REPORT
        if report.exists():
            cases = json.loads(report.read_text())["cases"]
            scores = [c["noise_score"] for c in cases]
            flags = [labels[c["id"]]["corrupted"] for c in cases]
            top = max(1, round(0.1 * len(cases)))
            row["noise_auroc"] = auroc(scores, flags)
            row["precision_top10"] = sum(flags[:top]) / top
            row["noise_ranking"] = [(c["id"], c["noise_score"], labels[c["id"]]["corrupted"]) for c in cases]
            row["corrections"] = correction_quality(run, folder / "train", low)
        results.append(row)
        save()
        print(json.dumps({k: v for k, v in row.items() if k != "noise_ranking"}), flush=True)


def spread(values: list[float], digits: int = 3) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    text = f"{statistics.mean(values):.{digits}f}"
    return text + (f" ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else "")


def summarise_arms(results: list) -> dict:
    seeds = sorted({r["seed"] for r in results})
    arms = [a for a in ARMS if any(r["arm"] == a for r in results)]
    by = {(r["seed"], r["arm"]): r for r in results}
    table = {}
    for arm in arms:
        rows = [by[s, arm] for s in seeds if (s, arm) in by]
        table[arm] = {key: [r.get(key) for r in rows] for key in
                      ("dice_1", "dice_5", "fpv_ml", "fnv_ml", "noise_auroc", "precision_top10")}
        table[arm]["seeds"] = [r["seed"] for r in rows]
    pairs = [("cpcl", "high"), ("cpcl", "clean")] + [(arm, "plain") for arm in arms if arm.startswith("cpcl")]
    paired = {}
    for key in ("dice_1", "dice_5"):
        for arm, other in pairs:
            common = [s for s in seeds if (s, arm) in by and (s, other) in by]
            if common:
                differences = [by[s, arm][key] - by[s, other][key] for s in common]
                paired[f"{key}: {arm} - {other}"] = {"seeds": common, "differences": differences,
                                                     "mean_ci95": interval(differences)}
    corrections = {arm: {s: by[s, arm]["corrections"] for s in seeds if "corrections" in by.get((s, arm), {})}
                   for arm in arms}
    return {"seeds": seeds, "arms": table, "paired": paired,
            "corrections": {arm: c for arm, c in corrections.items() if c}}


def print_summary(summary: dict) -> None:
    print(f"\nseeds {summary['seeds']}: mean ± sd over seeds")
    print("| arm | Dice 1 click | Dice 5 clicks | FPV mL | FNV mL | noise AUROC | precision, top 10% |")
    print("|---|---|---|---|---|---|---|")
    for arm, figures in summary["arms"].items():
        print(f"| {arm} | {spread(figures['dice_1'])} | {spread(figures['dice_5'])} | {spread(figures['fpv_ml'], 2)} | "
              f"{spread(figures['fnv_ml'], 2)} | {spread(figures['noise_auroc'], 2)} | "
              f"{spread(figures['precision_top10'], 2)} |")
    print("\npaired differences (per seed; mean, 95% interval):")
    for name, entry in summary["paired"].items():
        mean, low, high = entry["mean_ci95"]
        cells = ", ".join(f"{d:+.3f}" for d in entry["differences"])
        print(f"  {name}: {cells}; mean {mean:+.3f} ({low:+.3f}, {high:+.3f})")
    print("\ncorrected low-tier labels against the truth (per seed: Dice of the noisy label -> of CPCL's corrected "
          "one; voxels added / removed; certain-noisy share while training):")
    for arm, per_seed in summary["corrections"].items():
        cells = "; ".join(f"{seed}: {c['noisy_label_dice']:.3f} -> {c['corrected_label_dice']:.3f}, "
                          f"+{c['voxels_added']} / -{c['voxels_removed']}, {c['certain_noisy_share']:.2f}"
                          for seed, c in per_seed.items())
        print(f"  {arm}: {cells}")


def plot(summary: dict, path: Path) -> None:
    plt = pyplot_agg()
    arms = list(summary["arms"])
    figure, axes = plt.subplots(1, 2, figsize=(max(9.0, 1.8 * len(arms)), 3.6))
    for axis, key, title in ((axes[0], "dice_1", "Dice after 1 click"), (axes[1], "dice_5", "Dice after 5 clicks")):
        for position, arm in enumerate(arms):
            values = summary["arms"][arm][key]
            axis.scatter([position] * len(values), values, color="0.6", s=14, zorder=2)
            axis.errorbar(position, np.mean(values), yerr=np.std(values, ddof=1) if len(values) > 1 else 0,
                          fmt="o", color="C0" if arm != "cpcl" else "C3", capsize=4, zorder=3)
        axis.set_xticks(range(len(arms)), arms)
        axis.set_title(title)
        axis.grid(axis="y", alpha=0.3)
    figure.suptitle(f"CPCL ablation, seeds {', '.join(map(str, summary['seeds']))} (mean ± sd, seeds grey)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    parser.add_argument("--train-cases", type=int, default=16)
    parser.add_argument("--test-cases", type=int, default=6)
    parser.add_argument("--low-share", type=float, default=0.75, help="share of training labels that are low-tier")
    parser.add_argument("--corrupt-rate", type=float, default=0.8, help="share of low-tier labels corrupted")
    parser.add_argument("--steps", type=int, default=180, help="fast steps per arm (three epochs)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--crops-per-object", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--arms", nargs="+", default=[a for a in ARMS if a not in VARIANTS], choices=list(ARMS),
                        help=f"the ablation's arms; variants of CPCL to try: {', '.join(VARIANTS)}")
    parser.add_argument("--out", type=Path, default=REPO / "work" / "cpcl")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--merge", type=Path, nargs="*", default=[],
                        help="results.json files of runs over other seeds to summarise with")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    results = [row for path in args.merge for row in json.loads(path.read_text())["results"]]
    path = args.out / "results.json"

    def save():
        path.write_text(json.dumps({"settings": {k: str(v) if isinstance(v, Path) else v for k, v in
                                                 vars(args).items() if k != "merge"}, "results": results}, indent=1))

    for seed in args.seeds:
        run_seed(args, seed, results, save)
    summary = summarise_arms(results)
    save()
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    print_summary(summary)
    plot(summary, args.out / "cpcl_ablation.png")
    print(f"\nplot: {args.out / 'cpcl_ablation.png'}; figures: {path}")


if __name__ == "__main__":
    main()
