"""Train from a folder of images and labels, alone or under torchrun:

    python -m segany_pet.train --images DIR --labels DIR --out DIR [--config train.json] [--epochs N] ...
    torchrun --nproc_per_node=2 -m segany_pet.train --images DIR --labels DIR --out DIR ...
    python -m segany_pet.train ... --method cpcl --tiers tiers.json      # CPCL on expert and noisy labels
    python -m segany_pet.train ... --init-checkpoint M.pt --fast         # the fast loop: decoder only

``--config`` is a JSON object of TrainConfig fields; the flags override it. ``--tiers`` is a JSON object
{case id: "high" | "low"} (cases it leaves out are "high").
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from segany_pet.train import TrainConfig, make_trainer, records_from_folder

FLAGS = {  # flag -> (TrainConfig field, type)
    "--epochs": ("epochs", int),
    "--iterations": ("iterations_per_epoch", int),
    "--batch-size": ("batch_size", int),
    "--lr": ("lr", float),
    "--preset": ("preset", str),
    "--init-checkpoint": ("init_checkpoint", str),
    "--val-cases": ("val_cases", int),
    "--seed": ("seed", int),
    "--method": ("method", str),
    "--threads": ("threads", int),
}


def main(argv: list[str] | None = None, prog: str = "python -m segany_pet.train") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    parser.add_argument("--images", required=True, help="folder of SUV images <id>.nii.gz")
    parser.add_argument("--labels", required=True, help="folder of labels <id>.nii.gz on the images' grids")
    parser.add_argument("--out", required=True, help="output folder (checkpoints, train_stats.json)")
    parser.add_argument("--config", help="JSON file of TrainConfig fields")
    parser.add_argument("--tiers", help="JSON file {case id: 'high' or 'low'} (label quality; default high)")
    for flag, (name, kind) in FLAGS.items():
        parser.add_argument(flag, type=kind, dest=name)
    parser.add_argument("--fast", action="store_true",
                        help="freeze the image encoder, encode each crop once, train the prompt encoder and decoder")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    options = json.loads(open(args.config).read()) if args.config else {}
    options.update({name: getattr(args, name) for name, _ in FLAGS.values() if getattr(args, name) is not None})
    options["output_dir"] = args.out
    if args.fast:
        options["fast"] = True
    tiers = json.loads(open(args.tiers).read()) if args.tiers else None
    stats = make_trainer(TrainConfig.from_dict(options), records_from_folder(args.images, args.labels, tiers)).run()
    if stats:
        shown = ("status", "epoch", "step", "best_metric", "best_metric_epoch")  # epoch 0: the start model stayed best
        print(json.dumps({k: stats[k] for k in shown if k in stats}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
