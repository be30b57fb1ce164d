"""Your PET DICOM studies in OHIF with SegAnyPET Label: Orthanc on this machine, the server against it.

    .venv/bin/python scripts/serve_pacs.py --storage ~/pacs [--upload DICOM_DIR] [--port 8000] [--orthanc-port 8042]

Starts Debian's Orthanc (loopback only, DIMSE and remote access off, its database in --storage, which persists
between runs), uploads every DICOM file under --upload, starts the app with Orthanc's DICOMweb as its studies,
and prints an OHIF link per PET study. Ctrl-C stops both. In OHIF, open the MONAI Label panel, press the
connect button, then click on a lesion under Point Prompts; Save label stores the mask on the PACS as DICOM-SEG.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests

from segany_pet.cli import server_command, server_environment

ORTHANC = Path("/usr/sbin/Orthanc")
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def wait_until_up(url: str, process: subprocess.Popen, what: str, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f"{what} exited with code {process.returncode}")
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.3)
    sys.exit(f"{what} did not answer at {url} within {seconds:.0f} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--storage", type=Path, required=True, help="Orthanc's database folder (kept)")
    parser.add_argument("--upload", type=Path, help="folder of DICOM files to add to Orthanc first")
    parser.add_argument("--port", type=int, default=8000, help="SegAnyPET Label (OHIF's panel expects 8000)")
    parser.add_argument("--orthanc-port", type=int, default=8042)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # a plain kill stops both servers too
    if not ORTHANC.exists() or not DICOMWEB_PLUGIN.exists():
        sys.exit("Orthanc with its DICOMweb plugin is not installed: run bash scripts/setup.sh")

    args.storage.mkdir(parents=True, exist_ok=True)
    config = {"Name": "SegAnyPET Label PACS", "HttpPort": args.orthanc_port, "RemoteAccessAllowed": False,
              "AuthenticationEnabled": False, "DicomServerEnabled": False,
              "StorageDirectory": str(args.storage.resolve()), "IndexDirectory": str(args.storage.resolve()),
              "Plugins": [str(DICOMWEB_PLUGIN)], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}}
    (args.storage / "orthanc.json").write_text(json.dumps(config, indent=1))
    pacs = f"http://127.0.0.1:{args.orthanc_port}"
    processes = [subprocess.Popen([str(ORTHANC), str(args.storage / "orthanc.json")],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        wait_until_up(f"{pacs}/system", processes[0], "Orthanc")
        if args.upload:
            files = [path for path in sorted(args.upload.rglob("*")) if path.is_file()]
            stored = sum(requests.post(f"{pacs}/instances", data=path.read_bytes(), timeout=60,
                                       headers={"Content-Type": "application/dicom"}).status_code == 200
                         for path in files)
            print(f"uploaded {stored} of {len(files)} files to Orthanc (the others are not DICOM)")
        command = server_command(f"{pacs}/dicom-web", port=args.port)
        processes.append(subprocess.Popen(command, env=server_environment()))
        server = f"http://127.0.0.1:{args.port}"
        wait_until_up(f"{server}/info/", processes[1], "SegAnyPET Label", seconds=300)
        studies = requests.get(f"{pacs}/dicom-web/studies", params={"ModalitiesInStudy": "PT"}, timeout=30).json()
        print(f"\nOrthanc: {pacs}   SegAnyPET Label: {server}")
        for study in studies:
            uid = study["0020000D"]["Value"][0]
            print(f"OHIF: {server}/ohif/monai-label?StudyInstanceUIDs={uid}")
        if not studies:
            print("no PET study in Orthanc yet: add one with --upload DICOM_DIR")
        print("Ctrl-C stops both.")
        processes[1].wait()
    except KeyboardInterrupt:
        pass
    finally:
        for process in reversed(processes):
            process.terminate()
            process.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
