"""segany-pet: one command line for the project's stages.

    segany-pet phantom --out DIR [--cases N] [--tracer fdg|psma|mixed] [--grid 4mm|autopet]
    segany-pet noise --cohort DIR [--rate 0.4]
    segany-pet serve --studies DIR [--port 8000] [--conf key value ...]
    segany-pet demo [--dir demo] [--cases 12] [--port 8000]
    segany-pet train --images DIR --labels DIR --out DIR [...]     (python -m segany_pet.train --help)
    segany-pet evaluate --model FILE --cohort DIR --out DIR [--clicks 5] [--edge relative_41]
    segany-pet score STUDIES [--model FILE] [--box-model FILE] [--force]     (also under torchrun)
    segany-pet audit STUDIES --out DIR [--top 20]
    segany-pet suv DICOM_DIR OUT.nii.gz [--norm bw|lbm|bsa]     (one PET DICOM series -> SUV NIfTI, QIBA rules)
    segany-pet curate CONFIG STUDIES [--workers N] [--report DIR]     (several PET datasets -> one datastore)
    segany-pet token add|remove|list [NAME] --file FILE [--role annotator|admin]     (sign-in accounts)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from segany_pet.errors import CheckpointError, UserInputError
from segany_pet.segment.edge import EDGE_METHODS

REPO_ROOT = Path(__file__).resolve().parents[2]
APP_DIR = REPO_ROOT / "apps" / "segany_pet"


# The server answers each request on a new worker thread and torch's OpenMP gives each such thread its own
# team; with the default busy-waiting, idle teams spin on the 2 cores and a warm decode grew from 0.2 s to
# 4 s over four requests. Passive waiting keeps idle teams asleep. Read when torch loads: set before exec.
SERVER_ENVIRONMENT = {"OMP_WAIT_POLICY": "PASSIVE"}


def server_environment() -> dict[str, str]:
    """This process's environment plus the server's defaults (a value already set wins)."""
    return {**SERVER_ENVIRONMENT, **os.environ}


def server_command(studies: str | os.PathLike, port: int = 8000, host: str = "127.0.0.1", conf=()) -> list[str]:
    """The MONAI Label start command for this app, run with this interpreter (not whatever is on PATH)."""
    command = [sys.executable, "-m", "monailabel.main", "start_server", "--app", str(APP_DIR)]
    command += ["--studies", str(studies), "--host", host, "--port", str(port)]
    for key, value in conf:
        command += ["--conf", key, str(value)]
    return command


def _phantom(args) -> int:
    from segany_pet.phantom import write_cohort

    cases = write_cohort(args.out, args.cases, tracer=args.tracer, grid=args.grid, seed=args.seed)
    print(f"wrote {len(cases)} cases to {Path(args.out) / 'images'} (ground truth in {Path(args.out) / 'truth'})")
    return 0


def _noise(args) -> int:
    from segany_pet.phantom import write_noisy_labels

    out = args.out or Path(args.cohort) / "noisy_labels"
    cases = write_noisy_labels(args.cohort, out, rate=args.rate, seed=args.seed)["cases"]
    corrupted = sum(1 for record in cases.values() if record["corrupted"])
    print(f"wrote {len(cases)} labels to {out}; {corrupted} corrupted (records in noise_records.json)")
    return 0


def _serve(args) -> int:
    command = server_command(args.studies, args.port, args.host, args.conf or ())
    os.execve(command[0], command, server_environment())


def _demo(args) -> int:
    from segany_pet.phantom import write_cohort

    images = Path(args.dir) / "images"
    if not images.is_dir() or not any(images.glob("*.nii.gz")):
        print(f"building a demo cohort of {args.cases} synthetic whole-body PET scans in {args.dir} ...")
        write_cohort(args.dir, args.cases, tracer="mixed", grid="4mm", seed=args.seed)
    print(f"serving {images} at http://{args.host}:{args.port} (OHIF viewer needs a DICOMweb datastore)")
    command = server_command(images, args.port, args.host)
    os.execve(command[0], command, server_environment())


def _train(train_args: list[str]) -> int:
    from segany_pet.train.__main__ import main as train_main

    return train_main(train_args, prog="segany-pet train")


def _evaluate(args) -> int:
    from segany_pet.evaluate.cohort import evaluate_cohort
    from segany_pet.evaluate.report import markdown_table, write_report
    from segany_pet.model import load_checkpoint

    cohort = Path(args.cohort) if args.cohort else None
    images = Path(args.images) if args.images else cohort / "images"
    truth = Path(args.labels) if args.labels else cohort / "truth"
    model = load_checkpoint(args.model)
    edge = None if args.edge == "model" else args.edge
    summary, details = evaluate_cohort(model, images, truth, clicks=args.clicks, baselines=not args.no_baselines,
                                       autopet=not args.no_autopet, edge=edge)
    title = f"{Path(args.model).name} ({args.edge} edge) on {images}"
    paths = write_report(summary, args.out, name=args.name, title=title, details=details)
    print(markdown_table(summary, title))
    print("report: " + ", ".join(str(path) for path in paths.values()))
    return 0


def _score(args) -> int:
    import torch
    from tqdm import tqdm

    from segany_pet.active.scoring import models_key, progress_line, score_datastore, scoring_predictor
    from segany_pet.model import load_checkpoint

    datastore, served, box_file = _datastore_and_models(args)
    torch.set_num_threads(args.threads)
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))  # set by torchrun
    served_predictor, point_file = served.predictor_and_file()
    point = scoring_predictor(served_predictor.model)
    box = scoring_predictor(load_checkpoint(box_file)) if box_file else point
    with tqdm(desc=f"scoring (rank {rank} of {world_size})", unit="scan", disable=rank != 0) as bar:
        def advance(progress: dict) -> None:
            bar.total = progress["total"]
            bar.update(progress["done"] - bar.n)

        result = score_datastore(datastore, point, box, models_key(point_file, box_file), images=args.images,
                                 force=args.force, rank=rank, world_size=world_size, on_progress=advance)
    print(progress_line(result))
    return 1 if result["failed"] else 0


def _audit(args) -> int:
    from segany_pet.active.audit import write_audit
    from segany_pet.active.scoring import scoring_predictor
    from segany_pet.model import load_checkpoint

    datastore, served, box_file = _datastore_and_models(args)
    point = box = None
    if not args.no_models:
        point = scoring_predictor(served.predictor().model)
        box = scoring_predictor(load_checkpoint(box_file)) if box_file else point
    paths = write_audit(datastore, args.out, point, box, top=args.top)
    print("audit: " + ", ".join(str(path) for path in paths.values()))
    return 0


def _suv(args) -> int:
    from segany_pet.pet import read_pet_series, save_nifti

    out = Path(args.out)
    if not out.name.endswith((".nii", ".nii.gz")):
        raise UserInputError(f"{out}: the SUV image is written as NIfTI, give a name ending in .nii.gz")
    volume = read_pet_series(args.dicom_dir, norm=args.norm)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_nifti(volume.suv, volume.affine, out)
    # How the SUVs were computed travels with them: the factor, every header input, the warnings.
    sidecar = out.with_name(out.name.removesuffix(".gz").removesuffix(".nii") + ".json")
    sidecar.write_text(json.dumps(volume.meta, indent=1, default=str))
    conversion = volume.meta["suv_conversion"]
    source = f", decay to {conversion['scan_time_source']}" if conversion["scan_time_source"] else ""
    print(f"wrote {out}: {'x'.join(map(str, volume.shape))} voxels of "
          f"{'x'.join(f'{mm:.4g}' for mm in volume.spacing)} mm; SUV{args.norm} factor {volume.meta['suv_factor']:.8g} "
          f"per rescaled pixel value (Units {conversion['units']}, DecayCorrection "
          f"{conversion['decay_correction']}{source}); conversion record {sidecar}")
    for warning in volume.meta["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    return 0


def _curate(args) -> int:
    from tqdm import tqdm

    from segany_pet.curate import curate, load_config
    from segany_pet.curate.importer import STATE
    from segany_pet.curate.report import write_report
    from segany_pet.label.datastore import PETDatastore

    sources = load_config(args.config)
    studies = Path(args.studies)
    studies.mkdir(parents=True, exist_ok=True)
    datastore = PETDatastore(str(studies), extensions=("*.nii.gz", "*.nii"), auto_reload=False)
    with tqdm(desc="curating", unit="case") as bar:
        def advance(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        run = curate(sources, datastore, workers=args.workers, on_progress=advance)
    summary = run.to_dict()
    print(f"curated {summary['cases']} cases of {len(sources)} sources into {studies}: {summary['imported']} "
          f"imported, {summary['unchanged']} unchanged, {summary['errors']} refused, {summary['warnings']} warnings "
          f"({summary['seconds']} s)")
    for problem in run.problems:
        print(f"{problem['severity']}: {problem['source']}/{problem['case']}: {problem['reason']}", file=sys.stderr)
    report_dir = Path(args.report) if args.report else studies / STATE / "report"
    paths = write_report(datastore, report_dir, run=summary, gallery=args.gallery)
    print("report: " + ", ".join(str(path) for path in paths.values()))
    return 0


def _token(args) -> int:
    from segany_pet.label.access import add_account, read_accounts, remove_account

    if args.action == "add":
        token = add_account(args.file, args.name, args.role)
        print(f"{args.name} ({args.role}): {token}")
        print(f"the token is shown only now ({args.file} keeps its SHA-256); serve with --conf auth_tokens "
              f"{Path(args.file).resolve()}", file=sys.stderr)
    elif args.action == "remove":
        if not remove_account(args.file, args.name):
            raise UserInputError(f"{args.file} has no account {args.name!r}")
        print(f"removed {args.name}; a running server refuses its token from the next request on")
    else:
        for name, (role, _) in sorted(read_accounts(Path(args.file)).items()):
            print(f"{name}\t{role}")
    return 0


def _datastore_and_models(args):
    """The datastore of STUDIES and the models the server would score it with (or --model / --box-model)."""
    from segany_pet.label.activelearning import box_replica_path
    from segany_pet.label.datastore import PETDatastore
    from segany_pet.label.models import STATE_DIR, ServedModel, served_model_for

    studies = Path(args.studies)
    if not studies.is_dir():
        raise UserInputError(f"{studies} is not a folder: give the datastore's folder of SUV NIfTI images")
    datastore = PETDatastore(str(studies), extensions=("*.nii.gz", "*.nii"), auto_reload=False)
    if args.model:
        served, box_file = ServedModel(Path(args.model).resolve()), None
    else:
        served = served_model_for(studies / STATE_DIR)
        box_file = box_replica_path(served)
    if args.box_model:
        box_file = Path(args.box_model)
    return datastore, served, box_file


def _reporting_errors(command: str, run) -> int:
    """Exit status 2 with the message, no traceback, for input the user can fix."""
    try:
        return run()
    except (UserInputError, CheckpointError) as exc:
        print(f"segany-pet {command}: {exc}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["train"]:
        return _reporting_errors("train", lambda: _train(argv[1:]))
    parser = argparse.ArgumentParser(prog="segany-pet", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    phantom = commands.add_parser("phantom", help="write a synthetic whole-body PET cohort")
    phantom.add_argument("--out", required=True, help="output folder (images/ and truth/ inside)")
    phantom.add_argument("--cases", type=int, default=10)
    phantom.add_argument("--tracer", choices=["fdg", "psma", "mixed"], default="mixed")
    phantom.add_argument("--grid", choices=["4mm", "autopet"], default="4mm")
    phantom.add_argument("--seed", type=int, default=0)
    phantom.set_defaults(run=_phantom)

    noise = commands.add_parser("noise", help="write low-quality labels from a cohort's ground truth")
    noise.add_argument("--cohort", required=True, help="a folder written by 'segany-pet phantom'")
    noise.add_argument("--out", help="output folder (default: COHORT/noisy_labels)")
    noise.add_argument("--rate", type=float, default=0.4, help="share of cases corrupted")
    noise.add_argument("--seed", type=int, default=0)
    noise.set_defaults(run=_noise)

    serve = commands.add_parser("serve", help="serve a folder of SUV NIfTI files")
    serve.add_argument("--studies", required=True, help="folder of SUV NIfTI images")
    serve.add_argument("--conf", nargs=2, action="append", metavar=("KEY", "VALUE"), help="app option")
    serve.set_defaults(run=_serve)

    demo = commands.add_parser("demo", help="build a demo cohort if missing, then serve it")
    demo.add_argument("--dir", default="demo", help="where the demo cohort lives")
    demo.add_argument("--cases", type=int, default=12)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(run=_demo)

    # Listed for --help only: main() hands "train ..." to segany_pet.train's own parser.
    commands.add_parser("train", help="train a model on images and labels (segany-pet train --help)")

    evaluate = commands.add_parser(
        "evaluate", help="interactive benchmark of a model: Dice over clicks, FPV, FNV, baselines, autoPET IV"
    )
    evaluate.add_argument("--model", required=True, help="checkpoint file (own, SAM-Med3D or SegAnyPET)")
    evaluate.add_argument("--cohort", help="folder with images/ and truth/ as 'segany-pet phantom' writes")
    evaluate.add_argument("--images", help="folder of SUV images (instead of COHORT/images)")
    evaluate.add_argument("--labels", help="folder of lesion labels <case>.nii.gz (instead of COHORT/truth)")
    evaluate.add_argument("--out", required=True, help="where the table, JSON and plot go")
    evaluate.add_argument("--name", default="interactive_eval", help="file name of the report")
    evaluate.add_argument("--clicks", type=int, default=5, help="clicks per lesion")
    evaluate.add_argument("--no-baselines", action="store_true", help="skip the SUV threshold baselines")
    evaluate.add_argument("--no-autopet", action="store_true", help="skip the autoPET IV protocol")
    evaluate.add_argument("--edge", choices=["model", *EDGE_METHODS], default="model",
                          help="mask boundary: the model's own (default), or snapped to the lesion's uptake as the "
                               "app does (sized_41)")
    evaluate.set_defaults(run=_evaluate)

    score = commands.add_parser(
        "score", help="cross-prompt disagreement and label-noise scores for a datastore (runs under torchrun too)"
    )
    audit = commands.add_parser("audit", help="ranked CSV and HTML page of the labels the models contradict")
    for task in (score, audit):
        task.add_argument("studies", help="the datastore: the folder of SUV NIfTI images the server serves")
        task.add_argument("--model", help="point-prompted model (default: what the server serves for STUDIES)")
        task.add_argument("--box-model", help="box-prompted model (default: a published CPCL box replica, "
                                              "else the point model prompted with boxes)")
    score.add_argument("--images", nargs="+", help="only these image ids")
    score.add_argument("--force", action="store_true", help="rescore scans whose image, label and model are unchanged")
    score.add_argument("--threads", type=int, default=2, help="torch threads per process")
    score.set_defaults(run=_score)
    audit.add_argument("--out", required=True, help="where suspicious_labels.csv and index.html go")
    audit.add_argument("--top", type=int, default=20, help="labels shown with figures")
    audit.add_argument("--no-models", action="store_true", help="draw the stored labels only (no consensus)")
    audit.set_defaults(run=_audit)

    suv = commands.add_parser("suv", help="convert one PET DICOM series to an SUV NIfTI (QIBA vendor-neutral rules)")
    suv.add_argument("dicom_dir", help="folder holding one PET series (searched recursively)")
    suv.add_argument("out", help="output SUV image, .nii.gz")
    suv.add_argument("--norm", choices=["bw", "lbm", "bsa"], default="bw",
                     help="body weight (SUVbw), lean body mass (SUL) or body surface area (SUVbsa)")
    suv.set_defaults(run=_suv)

    curate = commands.add_parser("curate", help="import several PET datasets into one tiered datastore, "
                                                "with checks and a QC report (config: docs/curation.md)")
    curate.add_argument("config", help="YAML or JSON file listing the sources")
    curate.add_argument("studies", help="the datastore folder to build or extend")
    curate.add_argument("--workers", type=int, default=None, help="worker processes (default: one per CPU)")
    curate.add_argument("--report", help="where report.json and index.html go "
                                         "(default: STUDIES/.segany_pet/curate/report)")
    curate.add_argument("--gallery", type=int, default=12, help="cases drawn in the report's gallery")
    curate.set_defaults(run=_curate)

    token = commands.add_parser("token", help="sign-in accounts of a lab server: add (prints a new token), remove, "
                                              "list (serve with --conf auth_tokens FILE)")
    token.add_argument("action", choices=["add", "remove", "list"])
    token.add_argument("name", nargs="?", help="account name (add, remove)")
    token.add_argument("--role", choices=["annotator", "admin"], default="annotator",
                       help="annotators infer, fetch and save labels; admins also upload, delete, train, score and "
                            "read logs")
    token.add_argument("--file", required=True, help="the accounts file (JSON; created by the first add)")
    token.set_defaults(run=_token)

    for server in (serve, demo):
        server.add_argument("--port", type=int, default=8000)
        server.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to serve other machines")

    args = parser.parse_args(argv)
    if args.command == "evaluate" and not args.cohort and not (args.images and args.labels):
        parser.error("evaluate needs --cohort DIR, or --images DIR and --labels DIR")
    if args.command == "token" and args.action != "list" and not args.name:
        parser.error(f"token {args.action} needs an account name")
    return _reporting_errors(args.command, lambda: args.run(args))


if __name__ == "__main__":
    sys.exit(main())
