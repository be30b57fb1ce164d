"""segany-pet: one command line for the project's stages.

    segany-pet phantom --out DIR [--cases N] [--tracer fdg|psma|mixed] [--grid 4mm|autopet]
    segany-pet noise --cohort DIR [--rate 0.4]
    segany-pet serve --studies DIR [--port 8000] [--conf key value ...]
    segany-pet demo [--dir demo] [--cases 12] [--port 8000]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

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


def main(argv: list[str] | None = None) -> int:
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

    for server in (serve, demo):
        server.add_argument("--port", type=int, default=8000)
        server.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to serve other machines")

    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
