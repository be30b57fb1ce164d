"""A DICOMweb PACS (Orthanc, ...) as the app's datastore, for PET.

MONAI Label's DICOMWebDatastore, made to work offline with PET: it lists PT series (MONAI Label's default
filter shows CT only), re-lists after LIST_SECONDS (not after 2 hours), converts a series to SUV with the QIBA
rules on first use (MONAI Label's conversion leaves Bq/mL, which no model here may see) and saves an
annotator's ``final`` label as a DICOM-SEG referencing the PET series through pydicom-seg (MONAI Label's
default needs dcmqi, downloaded from the internet at start). The SEG is built and checked before anything is
sent, so a failure leaves nothing half-written on the PACS. Scores, leases and label info live in the local
cache's datastore file (PETDatastore transactions), which outlasts restarts; labels live on the PACS.
OHIF reaches the PACS through the server's ``/proxy/dicom/`` (`serve_confined_dicomweb_proxy`).
"""

from __future__ import annotations

import logging
import os
import re
import time
from pathlib import Path

import anyio
import pydicom
import requests
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import Response
from monailabel.datastore.dicom import DICOMwebClientX, DICOMWebDatastore
from monailabel.datastore.utils.convert import nifti_to_dicom_seg
from monailabel.datastore.utils.dicom import dicom_web_download_series, dicom_web_upload_dcm
from monailabel.interfaces.datastore import DefaultLabelTag
from pydicom.dataset import Dataset

from segany_pet.errors import UserInputError
from segany_pet.label.datastore import PETDatastore, checked_name
from segany_pet.label.dicom_studies import add_converted_series
from segany_pet.label.routes import replace_route
from segany_pet.pet import read_pet_series

logger = logging.getLogger(__name__)

LIST_SECONDS = 30.0
PET_FILTER = {"Modality": "PT"}


class PACSUnavailableError(UserInputError):
    """The DICOMweb server cannot be reached or refuses a request."""

    status_code = 502


def dicomweb_client(url: str) -> DICOMwebClientX:
    """A DICOMweb client that fails at once when the server is down (dicomweb-client's retries took 30 s per
    query to a closed port, which stalled /info)."""
    client = DICOMwebClientX(url=url)
    client.set_http_retry_params(retry=False)
    return client


class PETDICOMWebDatastore(DICOMWebDatastore, PETDatastore):
    """PT series of a DICOMweb server as SUV images; final labels back to it as DICOM-SEG."""

    def __init__(self, client, cache_path: str | os.PathLike):
        self._listed: tuple[float, list[str]] | None = None
        super().__init__(client, search_filter=PET_FILTER, cache_path=str(cache_path), fetch_by_frame=False,
                         convert_to_nifti=True)

    def _search(self, filters: dict) -> list[dict]:
        try:
            return self._client.search_for_series(search_filters=filters)
        except requests.RequestException as exc:
            raise self._unreachable(exc) from exc

    def _unreachable(self, exc: Exception) -> PACSUnavailableError:
        return PACSUnavailableError(f"the DICOMweb server {self._client.base_url} cannot be reached or refused "
                                    f"the query ({exc}); check that it runs and the URL")

    def list_images(self) -> list[str]:
        """PT series, re-listed after LIST_SECONDS so new studies show up while the server runs."""
        now = time.monotonic()
        if self._listed is None or now - self._listed[0] > LIST_SECONDS:
            series = [str(Dataset.from_json(ds)["SeriesInstanceUID"].value) for ds in self._search(PET_FILTER)]
            self._listed = (now, series)
        return list(self._listed[1])

    def get_image_uri(self, image_id: str) -> str:
        """The series as SUV NIfTI in the local cache, downloaded and converted on first use."""
        checked_name(image_id, "image id")
        converted = Path(self._datastore.image_path()) / f"{image_id}.nii.gz"
        if converted.exists():
            return str(converted)
        if image_id not in self.list_images():
            return ""
        add_converted_series(self, image_id, read_pet_series(self._series_dir(image_id)), {"source": "dicomweb"})
        return str(converted)

    def _series_dir(self, image_id: str) -> Path:
        series_dir = Path(self._datastore.image_path()) / image_id
        if not series_dir.is_dir() or not any(series_dir.iterdir()):
            try:
                dicom_web_download_series(None, image_id, str(series_dir), self._client)
            except requests.RequestException as exc:
                raise PACSUnavailableError(f"series {image_id} could not be downloaded from "
                                           f"{self._client.base_url} ({exc})") from exc
        return series_dir

    def get_labeled_images(self, label_tag: str | None = None, labels: list[str] | None = None) -> list[str]:
        """Series labeled through this server (the local cache) or with a SEG on the PACS."""
        local = PETDatastore.get_labeled_images(self, label_tag, labels)
        try:
            remote = super().get_labeled_images(label_tag, labels)
        except requests.RequestException as exc:
            raise self._unreachable(exc) from exc
        return sorted(set(local) | set(remote))

    def status(self) -> dict:
        """Counts for /info; with the PACS down, zero counts and the reason (the server keeps answering)."""
        try:
            return super().status()
        except PACSUnavailableError as exc:
            return {"total": 0, "completed": 0, "label_tags": {}, "error": str(exc)}

    def get_label_uri(self, label_id: str, label_tag: str, image_id: str = "") -> str:
        """The local copy of a label saved through this server, else MONAI Label's download of its SEG."""
        local = PETDatastore.get_label_uri(self, label_id, label_tag)
        if local and os.path.exists(local):
            return local
        return super().get_label_uri(label_id, label_tag, image_id)

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict,
                   label_id: str = "", label_values=None) -> str:
        return PETDatastore.save_label(self, image_id, label_filename, label_tag, label_info,  # not MONAI Label's
                                       label_values)

    def _store_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict) -> str:
        """A ``final`` label goes to the PACS as DICOM-SEG first, then into the local cache; other tags stay
        local."""
        label_info = dict(label_info or {})
        if label_tag == DefaultLabelTag.FINAL:
            if not self.get_image_uri(image_id):
                raise UserInputError(f"image {image_id!r} is not a PET series of {self._client.base_url}")
            seg_file = nifti_to_dicom_seg(str(self._series_dir(image_id)), label_filename,
                                          label_info.get("label_info"), use_itk=False)
            if not seg_file:
                raise UserInputError("the label is empty: there is nothing to save as DICOM-SEG")
            try:
                check_seg_references(seg_file, image_id)
                label_info["SeriesInstanceUID"] = dicom_web_upload_dcm(seg_file, self._client)
            except requests.RequestException as exc:
                raise PACSUnavailableError(f"the DICOM-SEG could not be stored on {self._client.base_url} "
                                           f"({exc}); the label was not saved") from exc
            finally:
                os.unlink(seg_file)
        return PETDatastore._store_label(self, image_id, label_filename, label_tag, label_info)


def check_seg_references(seg_file: str, series_uid: str) -> None:
    """The SEG must reference the PET series it was drawn on (a SEG pointing elsewhere would be misfiled)."""
    seg = pydicom.dcmread(seg_file, stop_before_pixels=True)
    referenced = [str(item.SeriesInstanceUID) for item in seg.get("ReferencedSeriesSequence", [])]
    if referenced != [series_uid]:
        raise UserInputError(f"the DICOM-SEG references series {referenced}, not {series_uid}; not stored")


# A DICOMweb resource path as OHIF asks for it: UIDs, keywords and frame lists, no dot segments.
DICOMWEB_PATH = re.compile(r"[A-Za-z0-9_,-]+(\.[A-Za-z0-9_,-]+)*(/[A-Za-z0-9_,-]+(\.[A-Za-z0-9_,-]+)*)*")
PROXIED_REQUEST_HEADERS = ("accept", "content-type")  # never the client's Authorization or cookies
PROXIED_REPLY_HEADERS = ("content-type", "content-encoding")
PROXY_TIMEOUT_S = 120


def serve_confined_dicomweb_proxy(app: FastAPI, studies_url: str | None) -> None:
    """``/proxy/dicom/...`` (OHIF's way to the PACS) reaching only the PACS's DICOMweb resources.

    MONAI Label's proxy joins any path to the studies URL (``../`` reached the PACS's own REST API, which can
    delete studies or shut the PACS down) and forwards the client's headers, this server's bearer token
    included. Here a path is a DICOMweb resource path (`DICOMWEB_PATH`) under the studies URL, only ``accept``
    and ``content-type`` travel, POST is STOW-RS alone (``studies[/<uid>]``), the query string goes along, and
    the request runs in a worker thread rather than on the event loop. ``studies_url``: None for a local
    datastore (404).
    """
    from monailabel.config import settings
    from monailabel.endpoints import proxy as endpoint

    def forward(request: Request, op: str, path: str):
        if studies_url is None:
            raise HTTPException(status_code=404, detail="this server has no DICOMweb PACS behind it: its studies "
                                                        "are a local folder")
        if not DICOMWEB_PATH.fullmatch(path):
            raise UserInputError(f"{path!r} is not a DICOMweb resource path such as studies/<uid>/series")
        prefix = {"wado": settings.MONAI_LABEL_WADO_PREFIX, "qido": settings.MONAI_LABEL_QIDO_PREFIX,
                  "stow": settings.MONAI_LABEL_STOW_PREFIX}.get(op) or ""
        if op == "qido" and path.endswith("metadata"):  # some OHIF versions ask QIDO for WADO's metadata
            prefix = settings.MONAI_LABEL_WADO_PREFIX or ""
        if request.method == "POST" and not re.fullmatch(r"studies(/[0-9.]+)?", path):
            raise HTTPException(status_code=405, headers={"Allow": "GET"},
                                detail="only STOW-RS (POST studies) may be sent to the PACS through this server")
        url = "/".join(part.strip("/") for part in (studies_url, prefix, path) if part)
        headers = {key: request.headers[key] for key in PROXIED_REQUEST_HEADERS if key in request.headers}
        username, password = settings.MONAI_LABEL_DICOMWEB_USERNAME, settings.MONAI_LABEL_DICOMWEB_PASSWORD
        options = {"params": request.query_params.multi_items(), "headers": headers, "stream": True,
                   "auth": (username, password) if username and password else None, "timeout": PROXY_TIMEOUT_S}
        try:
            if request.method == "POST":
                body = anyio.from_thread.run(request.body)
                reply = requests.post(url, data=body, **options)
            else:
                reply = requests.get(url, **options)
        except requests.RequestException as exc:
            raise HTTPException(status_code=502, detail=f"the PACS at {studies_url} did not answer ({exc})") from exc
        with reply:
            content = reply.raw.read()
        kept = {key: reply.headers[key] for key in PROXIED_REPLY_HEADERS if key in reply.headers}
        return Response(content=content, status_code=reply.status_code, headers=kept)

    # The catch-all first: each route added goes before those added earlier (add_route_first).
    for original, op in [(endpoint.proxy, ""), (endpoint.proxy_stow, "stow"), (endpoint.proxy_qido, "qido"),
                         (endpoint.proxy_wado, "wado")]:
        def replacement(request, path, user, op=op):
            return forward(request, op, path)

        replace_route(app, endpoint.router, original, replacement)
