"""The training loops side by side in one run: full fine-tuning and the fast annotation loop, each plain and
CPCL; seconds per step and per crop, the one-off encoding, and the wall-clock.

All fine-tune the shipped model on the same labeled 4 mm phantoms with the same steps: the full step encodes
every crop (``batch_size`` crops, every parameter trained); the fast step (``fast: true``) draws
``--fast-batch`` crops from embeddings computed once (encoder frozen). The CPCL loops train the point and the
box replica on the same crops, every step in stage 2 (confidence targets and cross-supervision on the half of
the cases marked low-tier). Printed: median seconds per step, per crop and the ratios fast / full and CPCL /
plain.

    .venv/bin/python scripts/benchmark_fast_training.py [--cases 4] [--steps 30] [--out work/fast_training]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from benchmark_cpcl import noisy_labels, write_cohort

from segany_pet.train import make_trainer

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "model" / "segany_pet_small.pt"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", type=int, default=4)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--full-batch", type=int, default=2)
    parser.add_argument("--fast-batch", type=int, default=8)
    parser.add_argument("--crops-per-object", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "work" / "fast_training")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ids = write_cohort(args.out / "cohort", args.cases, 0, 50)
    noisy_labels(args.out / "cohort", ids, 0, low_share=0.0, corrupt_rate=0.0)
    records = [{"id": i, "image": str(args.out / "cohort" / "images" / f"{i}.nii.gz"),
                "label": str(args.out / "cohort" / "labels" / f"{i}.nii.gz"), "tier": "low" if n % 2 else "high"}
               for n, i in enumerate(ids)]
    rows = {}
    loops = (("full", False, args.full_batch, "plain"), ("fast", True, args.fast_batch, "plain"),
             ("full cpcl", False, args.full_batch, "cpcl"), ("fast cpcl", True, args.fast_batch, "cpcl"))
    for name, fast, batch, method in loops:
        config = {"output_dir": str(args.out / name.replace(" ", "_")), "init_checkpoint": str(MODEL), "epochs": 1,
                  "iterations_per_epoch": args.steps, "batch_size": batch, "val_cases": 0, "threads": args.threads,
                  "progress_bar": False, "resume": False, "fast": fast, "method": method, "cpcl_warmup_epochs": 0,
                  "fast_crops_per_object": args.crops_per_object}
        started = time.perf_counter()
        stats = make_trainer(config, records).run()
        step = stats["seconds_per_iteration"]
        rows[name] = {"batch": batch, "step": step, "crop": step / batch, "total": time.perf_counter() - started,
                      "encode": stats.get("fast", {}).get("encode_seconds", 0.0)}
        print(f"{name}: batch {batch}, {step:.3f} s per step, {step / batch:.3f} s per crop; encoding once "
              f"{rows[name]['encode']:.0f} s; {args.steps} steps in {rows[name]['total']:.0f} s", flush=True)
    print(f"fast / full: per step {rows['fast']['step'] / rows['full']['step']:.2f}x, per crop "
          f"{rows['fast']['crop'] / rows['full']['crop']:.2f}x ({rows['full']['crop'] / rows['fast']['crop']:.1f} "
          "times the crops per second)")
    for loop in ("full", "fast"):
        print(f"{loop}: a CPCL step over a plain step {rows[loop + ' cpcl']['step'] / rows[loop]['step']:.2f}x")


if __name__ == "__main__":
    main()
