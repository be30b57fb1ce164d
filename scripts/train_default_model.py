"""Train the shipped default model (preset segany_pet_small) on synthetic PET, then benchmark it interactively.

    .venv/bin/python scripts/train_default_model.py --quick                 # end-to-end smoke run, < 2 min
    .venv/bin/python scripts/train_default_model.py --train-cases 40 --test-cases 12 --epochs 60
    .venv/bin/python scripts/train_default_model.py --test-cases 12 --cohorts-only   # stage 1 alone

Stages (each reusable: cohorts and the training resume when the script is run again with the same folders):
1. cohorts: a training and a separate test cohort of positive FDG and PSMA phantoms (4 mm), alternating
   tracers; labels/ holds the training labels (lesion = 1, organs too with --organs), truth/ the lesion
   instances and the phantom's records (which lesions touch a hot organ);
2. training with segany_pet.train (checkpoints and train_stats.json in WORK/training_<preset>);
3. the best model published as OUT/<preset>.pt (own checkpoint format: preset + training record + model card);
4. the interactive benchmark on the test cohort: Dice after 1, 3, 5 clicks per lesion, FPV, FNV, the classical
   baselines from the same first click, lesions touching an organ vs isolated, and the autoPET IV protocol;
   written as OUT/<preset>_eval.{md,json,png}. The model's own masks: the app's uptake edge is measured on the
   same cohort by ``segany-pet evaluate --edge sized_41`` (model/README.md).

--preset takes a preset name or a JSON file of Preset fields (to try a preprocessing before it becomes a preset).
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from segany_pet.evaluate.cohort import evaluate_cohort
from segany_pet.evaluate.report import markdown_table, write_report
from segany_pet.model import PRESETS, Preset, load_checkpoint, save_checkpoint
from segany_pet.pet import save_nifti
from segany_pet.pet.organs import ORGAN_NAMES
from segany_pet.phantom import generate_case
from segany_pet.train import MODEL_BEST, TrainConfig, Trainer, records_from_folder

REPO = Path(__file__).resolve().parents[1]
PRESET = "segany_pet_small"
SPLITS = {"train": 0, "test": 1}  # salt of each split's case seeds: the two cohorts never share a case
LESION = 1
MAX_MODEL_MB = 50


def cohort_seed(seed: int, split: str, index: int) -> int:
    return int(np.random.SeedSequence([seed, SPLITS[split], index]).generate_state(1)[0])


def write_positive_cohort(folder: Path, cases: int, seed: int, split: str, organs: bool) -> list[str]:
    """Positive 4 mm phantoms, FDG and PSMA alternating; kept when a previous run wrote the same cohort."""
    recipe = {"cases": cases, "seed": seed, "split": split, "organs": organs, "grid": "4mm"}
    stamp = folder / "cohort.json"
    if stamp.exists() and json.loads(stamp.read_text()) == recipe:
        return sorted(p.name[: -len(".json")] for p in (folder / "truth").glob("*.json"))
    for sub in ("images", "labels", "truth"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    ids = []
    for index in tqdm(range(cases), desc=f"{split} cohort", unit="case"):
        tracer = "fdg" if index % 2 == 0 else "psma"
        case_id = f"{split}_{tracer}_{index:04d}"
        case = generate_case(cohort_seed(seed, split, index), tracer, "4mm", negative=False)
        label = (case.lesions > 0).astype(np.uint8) * LESION
        if organs:  # organ k becomes class 1 + k, so lesions keep value 1 and win where they replace tissue
            label = np.where(label > 0, label, np.where(case.organs > 0, case.organs + 1, 0)).astype(np.uint8)
        save_nifti(case.suv, case.affine, folder / "images" / f"{case_id}.nii.gz")
        save_nifti(label, case.affine, folder / "labels" / f"{case_id}.nii.gz")
        save_nifti(case.lesions, case.affine, folder / "truth" / f"{case_id}_lesions.nii.gz")
        (folder / "truth" / f"{case_id}.json").write_text(json.dumps({"case_id": case_id, **case.info}, indent=1))
        ids.append(case_id)
    stamp.write_text(json.dumps(recipe))
    return ids


def label_names(organs: bool) -> dict[str, int]:
    names = {"lesion": LESION}
    if organs:
        names.update({name: value + 1 for value, name in ORGAN_NAMES.items()})
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny cohorts and a few steps: checks the pipeline")
    parser.add_argument("--work", type=Path, default=REPO / "work" / "default_model", help="cohorts and training")
    parser.add_argument("--out", type=Path, default=REPO / "model", help="model file and evaluation report")
    parser.add_argument("--train-cases", type=int, default=40)
    parser.add_argument("--test-cases", type=int, default=12)
    parser.add_argument("--val-cases", type=int, default=4, help="training cases held out for validation")
    parser.add_argument("--val-ids", help="comma-separated case ids held out for validation (instead of --val-cases)")
    parser.add_argument("--init-checkpoint", type=Path, help="fine-tune from this checkpoint instead of from scratch")
    parser.add_argument("--organs", action="store_true", help="train organs as classes too (lesions stay 1)")
    parser.add_argument("--preset", default=PRESET, help="a preset name or a JSON file of Preset fields")
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--iterations", type=int, default=100, help="optimizer steps per epoch")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=4e-4)
    parser.add_argument("--fresh-lr-factor", type=float, default=1.0,
                        help="fine-tuning: lr multiplier of the parameters the init checkpoint lacks")
    parser.add_argument("--touching-weight", type=float, default=1.0,
                        help="draw lesions beside hot uptake (an organ) this many times as often as others")
    parser.add_argument("--hot-spot-share", type=float, default=TrainConfig.hot_spot_share,
                        help="share of crops clicked on hot non-target uptake with an empty target")
    parser.add_argument("--clicks-per-sample", type=int, default=3, help="decoder iterations per training crop")
    parser.add_argument("--first-click-weight", type=float, default=1.0,
                        help="loss weight of the opening prompt relative to the corrective clicks")
    parser.add_argument("--eval-clicks", type=int, default=5)
    parser.add_argument("--no-autopet", action="store_true", help="skip the autoPET IV protocol")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cohorts-only", action="store_true",
                        help="write the training and test cohorts, then stop (for 'segany-pet evaluate')")
    args = parser.parse_args(argv)
    if args.quick:
        args.train_cases, args.test_cases, args.val_cases = 3, 2, 1
        args.epochs, args.iterations, args.batch_size, args.clicks_per_sample = 2, 4, 2, 2
        args.work = args.work.with_name(args.work.name + "_quick")
        if args.out == REPO / "model":  # a smoke run must never replace the shipped model
            args.out = args.work / "model"
    if args.preset in PRESETS:
        preset = PRESETS[args.preset]
    else:
        preset = Preset.from_dict(json.loads(Path(args.preset).read_text()))
    started = time.time()
    command = shlex.join([Path(sys.executable).name, *sys.argv])
    print(f"command: {command}\nseed: {args.seed}", flush=True)
    torch.set_num_threads(args.threads)

    train_dir, test_dir = args.work / "train_cohort", args.work / "test_cohort"
    write_positive_cohort(train_dir, args.train_cases, args.seed, "train", args.organs)
    write_positive_cohort(test_dir, args.test_cases, args.seed, "test", False)
    if args.cohorts_only:
        print(f"cohorts: {train_dir}, {test_dir}")
        return 0

    val_cases = args.val_ids.split(",") if args.val_ids else args.val_cases
    config = TrainConfig(
        output_dir=str(args.work / f"training_{preset.name}"), preset=preset.to_dict(),
        label_names=label_names(args.organs),
        epochs=args.epochs, iterations_per_epoch=args.iterations, batch_size=args.batch_size, lr=args.lr,
        fresh_lr_factor=args.fresh_lr_factor,
        clicks_per_sample=args.clicks_per_sample, first_click_weight=args.first_click_weight,
        touching_weight=args.touching_weight, hot_spot_share=args.hot_spot_share, val_cases=val_cases,
        seed=args.seed, threads=args.threads,
        init_checkpoint=str(args.init_checkpoint) if args.init_checkpoint else None,
        warmup_iterations=min(50, args.epochs * args.iterations // 10),
    )
    stats = Trainer(config, records_from_folder(train_dir / "images", train_dir / "labels")).run()
    if stats.get("status") != "finished":
        print(f"training {stats.get('status')}; run the same command again to continue")
        return 1
    per_step = stats["seconds_per_iteration"]  # None when this run found the training finished already
    timing = f", {per_step:.2f} s per step (median)" if per_step is not None else ""
    print(f"training: {stats['step']} steps of {args.batch_size} crops{timing}, best validation Dice after 1 click "
          f"{stats['best_metric']}", flush=True)

    best = Path(config.output_dir) / MODEL_BEST
    if not best.exists():  # fine-tuning where no epoch beat the start weights on validation (validate_start_model)
        print(f"no epoch beat the start weights' validation Dice after 1 click ({stats['best_metric']}): "
              f"{args.init_checkpoint} stays the better model and nothing is written to {args.out}")
        return 1
    model = load_checkpoint(best)
    args.out.mkdir(parents=True, exist_ok=True)
    summary, details = evaluate_cohort(model, test_dir / "images", test_dir / "truth", clicks=args.eval_clicks,
                                       autopet=not args.no_autopet)
    card = {
        "trained_on": f"{args.train_cases} synthetic whole-body PET phantoms (FDG and PSMA, 4 mm, positive cases; "
                      f"{len(val_cases) if args.val_ids else val_cases} held out for validation), segany_pet.phantom"
                      + (f", fine-tuned from {args.init_checkpoint.name}" if args.init_checkpoint else ""),
        "tested_on": f"{args.test_cases} separate phantoms",
        "command": command,
        "seed": args.seed,
        "date": datetime.date.today().isoformat(),
        "train_stats": {k: stats[k] for k in ("step", "epoch", "best_metric", "best_metric_epoch",
                                              "seconds_per_iteration", "total_time") if k in stats},
        "test_summary": {"dice_after_clicks": summary["model"]["all"]["dice_at"],
                         "touching_dice_after_clicks": summary["model"]["touching"]["dice_at"],
                         "best_baseline": summary.get("best_baseline"),
                         "margin_over_best_baseline_1click": summary.get("margin_over_best_baseline_1click")},
    }
    model_path = save_checkpoint(model, args.out / f"{preset.name}.pt", model_card=card)
    size_mb = model_path.stat().st_size / 2**20
    if size_mb > MAX_MODEL_MB:
        print(f"warning: {model_path} is {size_mb:.1f} MB, above {MAX_MODEL_MB} MB")
    title = f"{preset.name} on {args.test_cases} test phantoms"
    paths = write_report(summary, args.out, name=f"{preset.name}_eval", title=title,
                         details={**details, "model_card": card})
    print("\n" + markdown_table(summary, title))
    print(f"model: {model_path} ({size_mb:.1f} MB)")
    print("report: " + ", ".join(str(p) for p in paths.values()))
    print(f"total time {datetime.timedelta(seconds=int(time.time() - started))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
