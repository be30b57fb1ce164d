"""Helpers shared by tests (fixtures live in conftest.py)."""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np
import pydicom
import pytest
import requests

from segany_pet.cli import server_command, server_environment
from segany_pet.model import Preset
from segany_pet.pet import PETVolume
from segany_pet.phantom import generate_case

# A tiny 3D SAM with the published naming scheme: 32^3 crop at 6 mm (192 mm), 4^3 tokens, 16^3 low-res logits.
TINY = Preset(name="tiny", crop_size=32, spacing_mm=6.0, normalisation="log_suv", patch_size=8,
              encoder_dim=32, encoder_depth=2, encoder_heads=2, global_attn_indexes=(), window_size=0,
              prompt_dim=48, decoder_mlp_dim=64, iou_head_hidden=32)

REPO = Path(__file__).resolve().parents[1]

# Files a careless export puts in a studies folder; each must get a 4xx, not a crash.
BAD_IMAGES = ("corrupt_file", "dynamic_4d", "nan_filled", "raw_bq_per_ml")
# An autoPET-sized scan in the test cohort, hot sphere at voxel (200, 200, 163).
LARGE_SCAN = "large_autopet_grid"


def case_truth(cohort: Path, case: str) -> tuple[dict, np.ndarray]:
    """A phantom case's JSON record and its lesion instance map."""
    info = json.loads((cohort / "truth" / f"{case}.json").read_text())
    lesions = np.asanyarray(nib.load(cohort / "truth" / f"{case}_lesions.nii.gz").dataobj)
    return info, lesions


def read_nrrd(content: bytes) -> tuple[dict, np.ndarray]:
    """Header and array (stored index order) of an NRRD reply body."""
    stream = io.BytesIO(content)
    header = nrrd.read_header(stream)
    return header, nrrd.read_data(header, stream, index_order="F")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def running_server(studies: Path, conf: list[tuple[str, object]], log_dir: Path,
                   auto_reload: bool = False, host: str = "127.0.0.1", env: dict | None = None,
                   headers: dict | None = None) -> Iterator[str]:
    """A real MONAI Label server subprocess listening on ``host`` and serving ``studies``; yields its URL on
    127.0.0.1. ``auto_reload``: the datastore follows changes other processes make on disk (MONAI Label's default;
    off unless needed); ``env``: more environment variables; ``headers``: sent while waiting for /info/ (a token).
    Warming scans for clicks (``prewarm``) is off unless ``conf`` sets it: its background encoding would compete
    with the suite for the 2 cores; the tests of warming and the default-model server turn it on."""
    if not any(key == "prewarm" for key, _ in conf):
        conf = [*conf, ("prewarm", "false")]
    port = free_port()
    log_path = log_dir / "server.log"
    env = dict(server_environment(), MONAI_LABEL_DATASTORE_AUTO_RELOAD=str(auto_reload).lower(), **(env or {}))
    with open(log_path, "w") as log:
        process = subprocess.Popen(server_command(studies, port=port, host=host, conf=conf), stdout=log,
                                   stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"server exited with {process.returncode}:\n{log_path.read_text()[-4000:]}")
        try:
            if requests.get(f"{url}/info/", headers=headers, timeout=2).status_code == 200:
                break
        except requests.ConnectionError:
            pass
        time.sleep(0.3)
    else:
        process.kill()
        pytest.fail(f"server did not answer within 180 s:\n{log_path.read_text()[-4000:]}")
    try:
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()


TORCHRUN_WORKER = textwrap.dedent(
    """
    import hashlib, json, os, sys
    from segany_pet.train import make_trainer

    job = json.load(open(sys.argv[1]))
    trainer = make_trainer(job["config"], job["records"])
    trainer.run()

    def digest(model):
        value = hashlib.sha256()
        for key, tensor in sorted(model.state_dict().items()):
            value.update(key.encode())
            value.update(tensor.detach().cpu().numpy().tobytes())
        return value.hexdigest()

    result = {"weights": digest(trainer.model), "drawn": dict(trainer.sampler.drawn)}
    if hasattr(trainer, "box_model"):
        result["box_weights"] = digest(trainer.box_model)
    with open(os.path.join(job["out"], f"rank{os.environ['RANK']}.json"), "w") as f:
        json.dump(result, f)
    """
)


def train_under_torchrun(folder: Path, config, records: list[dict]) -> list[dict]:
    """Train with 2 CPU processes under torchrun; each rank's weight digests and crops drawn per case."""
    (folder / "worker.py").write_text(TORCHRUN_WORKER)
    job = {"config": config.to_dict(), "records": records, "out": str(folder)}
    (folder / "job.json").write_text(json.dumps(job))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "lib")}
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
               "--master_addr=127.0.0.1", f"--master_port={free_port()}", str(folder / "worker.py"),
               str(folder / "job.json")]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-4000:]
    return [json.loads((folder / f"rank{rank}.json").read_text()) for rank in (0, 1)]


def small_scan(seed: int, tracer: str = "fdg", size=(56, 56, 72), lesion: int | None = None):
    """A 4 mm phantom cut down to ``size`` around its largest lesion (or its lesion number ``lesion``):
    (volume, lesion instances, case info). The affine's origin moves to the crop's first voxel, so world
    positions stay those of the whole phantom."""
    case = generate_case(seed, tracer, "4mm", negative=False)
    if lesion is None:
        chosen = max(case.info["lesions"], key=lambda record: record["volume_ml"])
        centre = np.argwhere(case.lesions == chosen["id"]).mean(axis=0).round().astype(int)
    else:
        centre = case.info["lesions"][lesion]["centre_voxel"]
    start = [int(np.clip(c - n // 2, 0, s - n)) for c, n, s in zip(centre, size, case.suv.shape, strict=True)]
    box = tuple(slice(a, a + n) for a, n in zip(start, size, strict=True))
    affine = case.affine.copy()
    affine[:3, 3] = case.affine[:3, :3] @ start + case.affine[:3, 3]
    return PETVolume(case.suv[box].copy(), affine), case.lesions[box].copy(), case.info


def wait_for(condition, timeout=300, what="condition"):
    """``condition()``'s first truthy value, polled every half second; the test fails after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.5)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


@contextlib.contextmanager
def running_orthanc(folder: Path) -> Iterator[str]:
    """Debian's Orthanc with its DICOMweb plugin on 127.0.0.1, configured here (remote access, DIMSE and
    authentication off; storage in ``folder``); yields its URL. Skips the test when Orthanc is not installed."""
    executable = shutil.which("Orthanc") or shutil.which("Orthanc", path="/usr/sbin")
    plugin = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
    if executable is None or not plugin.exists():
        pytest.skip("Orthanc with its DICOMweb plugin is not installed (scripts/setup.sh installs it)")
    port = free_port()
    config = {"Name": "segany-pet-test", "HttpPort": port, "RemoteAccessAllowed": False,
              "AuthenticationEnabled": False, "DicomServerEnabled": False, "StorageDirectory": str(folder / "db"),
              "IndexDirectory": str(folder / "db"), "Plugins": [str(plugin)],
              "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}}
    (folder / "orthanc.json").write_text(json.dumps(config))
    with open(folder / "orthanc.log", "w") as log:
        process = subprocess.Popen([executable, str(folder / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: process.poll() is not None or _answers(f"{url}/system"), timeout=30, what="Orthanc")
        if process.poll() is not None:
            pytest.fail(f"Orthanc exited:\n{(folder / 'orthanc.log').read_text()[-3000:]}")
        yield url
    finally:
        process.terminate()
        process.wait(timeout=20)


def _answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=2).status_code == 200
    except requests.ConnectionError:
        return False


def upload_to_orthanc(url: str, files) -> None:
    for path in files:
        response = requests.post(f"{url}/instances", data=Path(path).read_bytes(),
                                 headers={"Content-Type": "application/dicom"}, timeout=30)
        assert response.status_code == 200, response.text


def seg_series(url: str) -> list[str]:
    """The series UIDs of the DICOM-SEGs in an Orthanc, through its DICOMweb API."""
    return [s["0020000E"]["Value"][0] for s in
            requests.get(f"{url}/dicom-web/series", params={"Modality": "SEG"}, timeout=30).json()]


def orthanc_instance(url: str, series_uid: str) -> pydicom.Dataset:
    """The (first) instance of a series, fetched through Orthanc's own REST API."""
    found = requests.post(f"{url}/tools/find", json={"Level": "Instance", "Query": {"SeriesInstanceUID": series_uid}},
                          timeout=30).json()
    content = requests.get(f"{url}/instances/{found[0]}/file", timeout=30).content
    return pydicom.dcmread(io.BytesIO(content))


@contextlib.contextmanager
def killable_server(studies: Path, conf: list[tuple[str, object]], log_path: Path,
                    auto_reload: bool = False) -> Iterator[tuple[subprocess.Popen, str]]:
    """As `running_server`, but the server leads its own process group (its training and scoring jobs are in
    it too) and is yielded with its URL, so that a test can SIGKILL the lot with `kill_group`."""
    port = free_port()
    env = dict(server_environment(), MONAI_LABEL_DATASTORE_AUTO_RELOAD=str(auto_reload).lower())
    with open(log_path, "w") as log:
        process = subprocess.Popen(server_command(studies, port=port, conf=conf), stdout=log,
                                   stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: process.poll() is not None or _answers(f"{url}/info/"), timeout=180, what="the server")
        if process.poll() is not None:
            pytest.fail(f"server exited with {process.returncode}:\n{log_path.read_text()[-4000:]}")
        yield process, url
    finally:
        kill_group(process)


def kill_group(process: subprocess.Popen) -> None:
    """SIGKILL a `killable_server`'s process group and wait until none of its processes is left."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)

    def gone() -> bool:
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            return True
        return False

    wait_for(gone, timeout=30, what=f"process group {process.pid} to die")


def distinct_label(lesions: nib.Nifti1Image, affine: np.ndarray, n: int) -> bytes:
    """A .nii.gz label's bytes for save number ``n``: the true lesions plus a small cube placed by ``n``, so
    successive saves differ (``lesions``: a phantom's lesion instance map; ``affine``: its image's)."""
    mask = (np.asarray(lesions.dataobj) > 0).astype(np.uint8)
    i, j, k = (4 + (n * step) % (size - 8) for step, size in zip((7, 13, 5), mask.shape, strict=True))
    mask[i : i + 3, j : j + 3, k : k + 3] = 1
    return gzip.compress(nib.Nifti1Image(mask, affine).to_bytes(), compresslevel=1, mtime=0)


def copy_phantoms(cohort: Path, folder: Path) -> list[str]:
    """The cohort's phantoms (not its bad files) copied into ``folder``, a throw-away datastore for tests that
    write: the shared cohort stays as it is. Returns the case ids."""
    folder.mkdir(parents=True, exist_ok=True)
    cases = sorted(path.stem for path in (cohort / "truth").glob("*.json"))
    for case in cases:
        shutil.copy(cohort / "images" / f"{case}.nii.gz", folder)
    return cases

