#!/usr/bin/env bash
# Set up SegAnyPET Label from scratch: a virtualenv in .venv with the pinned requirements and the
# project installed in editable mode. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
"$PYTHON" -c 'import sys; assert sys.version_info[:2] == (3, 11), "SegAnyPET Label needs Python 3.11"'

# Orthanc and its DICOMweb plugin (Debian packages): the PACS the DICOMweb tests and users' PET studies run on.
if [ ! -x /usr/sbin/Orthanc ] || [ ! -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ]; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq orthanc orthanc-dicomweb >/dev/null
fi

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/pip install --quiet -r requirements.txt
.venv/bin/pip install --quiet --no-deps -e .
.venv/bin/pip check
.venv/bin/python -c "import monailabel, segany_pet; print('SegAnyPET Label', segany_pet.__version__, 'ready in .venv')"
