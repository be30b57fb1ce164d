#!/usr/bin/env bash
# Set up SegAnyPET Label from scratch: a virtualenv in .venv with the pinned requirements and the
# project installed in editable mode. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
"$PYTHON" -c 'import sys; assert sys.version_info[:2] == (3, 11), "SegAnyPET Label needs Python 3.11"'

# Debian packages: Orthanc and its DICOMweb plugin (the PACS for users' PET studies and the DICOMweb tests) and
# Chromium (the OHIF test drives it through playwright; never "playwright install", which downloads).
if [ ! -x /usr/sbin/Orthanc ] || [ ! -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || [ ! -x /usr/bin/chromium ]; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq orthanc orthanc-dicomweb chromium >/dev/null
fi

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/pip install --quiet -r requirements.txt
.venv/bin/pip install --quiet --no-deps -e .
.venv/bin/pip check
.venv/bin/python -c "import monailabel, segany_pet; print('SegAnyPET Label', segany_pet.__version__, 'ready in .venv')"
