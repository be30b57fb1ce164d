"""A real Orthanc as the app's datastore: PET series listed and served in SUV, a final label back as DICOM-SEG
referencing the PET series on the same geometry, a PACS that cannot be reached answered clearly."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pydicom
import pydicom_seg
import pytest
import requests

from segany_pet.pet import save_nifti
from segany_pet.phantom.dicom import write_pet_series
from support import (
    free_port,
    orthanc_instance,
    running_orthanc,
    running_server,
    seg_series,
    small_scan,
    upload_to_orthanc,
)

pytestmark = [pytest.mark.server, pytest.mark.slow]


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    """Orthanc holding one PET series (and nothing else): (URL, series UID, the SUV volume written)."""
    folder = tmp_path_factory.mktemp("orthanc")
    volume, lesions, _ = small_scan(7, "fdg", size=(40, 36, 30))
    series_uid = pydicom.uid.generate_uid()
    files = write_pet_series(volume.suv, volume.affine, folder / "series", series_uid=series_uid)
    with running_orthanc(folder) as url:
        upload_to_orthanc(url, files)
        yield url, series_uid, volume, lesions


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("dicomweb_cache")


@pytest.fixture(scope="module")
def server(pacs, cache, tmp_path_factory):
    url, *_ = pacs
    folder = tmp_path_factory.mktemp("dicomweb_server")
    with running_server(f"{url}/dicom-web", [("dicomweb_cache", cache)], folder) as server_url:
        yield server_url


def test_pet_series_are_listed_and_served_in_suv(pacs, server):
    _, series_uid, volume, lesions = pacs
    assert requests.get(f"{server}/datastore/", timeout=60).json()["total"] == 1  # the PT series
    hottest = np.unravel_index(np.argmax(np.where(lesions > 0, volume.suv, 0)), volume.shape)
    params = {"foreground": [[int(v) for v in hottest]], "background": []}
    response = requests.post(f"{server}/infer/suv_threshold", params={"image": series_uid, "output": "json"},
                             data={"params": json.dumps(params)}, timeout=120)
    assert response.status_code == 200, response.text
    # SUV, not Bq/mL (thousands): the lesion's SUVmax within the int16 storage precision.
    suvmax = response.json()["quantification"]["total"]["suvmax"]
    assert 0.99 * volume.suv[hottest] <= suvmax <= 1.01 * volume.suv.max()
    info = requests.get(f"{server}/datastore/image/info", params={"image": series_uid}, timeout=30).json()
    assert info["source"] == "dicomweb" and info["suv_conversion"]["units"] == "BQML"


def test_the_dicomweb_proxy_reaches_only_the_pacs_dicomweb_resources(pacs, server):
    url, series_uid, _, _ = pacs
    series = requests.get(f"{server}/proxy/dicom/qido/series", params={"SeriesInstanceUID": series_uid},
                          headers={"Accept": "application/dicom+json"}, timeout=60)
    assert series.status_code == 200, series.text
    assert series.json()[0]["0020000E"]["Value"] == [series_uid]
    # Dot segments (sent encoded, as a client can) once reached Orthanc's own REST API beside /dicom-web.
    for method, path in [("GET", "%2E%2E/system"), ("GET", "qido/%2E%2E/%2E%2E/statistics"),
                         ("POST", "%2E%2E/tools/reset"), ("GET", "wado/studies/..%5C..%5Csystem")]:
        response = requests.request(method, f"{server}/proxy/dicom/{path}", timeout=60)
        assert response.status_code == 422, (method, path, response.text)
        assert "DICOMweb resource path" in response.json()["detail"]
    response = requests.post(f"{server}/proxy/dicom/qido/series", timeout=60)
    assert response.status_code == 405  # POST is STOW-RS alone
    assert requests.get(f"{url}/system", timeout=30).status_code == 200  # the PACS was not reset


def served_image(server: str, series_uid: str, folder) -> nib.Nifti1Image:
    response = requests.get(f"{server}/datastore/image", params={"image": series_uid}, timeout=60)
    assert response.status_code == 200, response.text
    (folder / "served.nii.gz").write_bytes(response.content)
    return nib.load(folder / "served.nii.gz")


def put_final_label(server: str, series_uid: str, path, label_info=None) -> requests.Response:
    params = {"label_info": label_info} if label_info else {}
    with open(path, "rb") as file:
        return requests.put(f"{server}/datastore/label", params={"image": series_uid, "tag": "final"},
                            files={"label": (path.name, file)}, data={"params": json.dumps(params)}, timeout=120)


@pytest.mark.parametrize("label_format", ["nifti", "ohif_bin"])
def test_a_final_label_is_stored_as_dicom_seg_on_the_pet_geometry(pacs, server, tmp_path, label_format):
    url, series_uid, _, _ = pacs
    served = served_image(server, series_uid, tmp_path)
    label = np.zeros(served.shape, np.uint8)
    label[10:14, 12:15, 8:11] = 1
    if label_format == "nifti":
        path = tmp_path / "label.nii.gz"
        save_nifti(label, served.affine, path)
    else:  # OHIF's MONAI Label client: the voxels alone, first axis fastest
        path = tmp_path / "label.bin"
        path.write_bytes(label.tobytes(order="F"))
    segs_before = seg_series(url)
    response = put_final_label(server, series_uid, path, [{"name": "lesion", "idx": 1}])
    assert response.status_code == 200, response.text

    (new_seg,) = set(seg_series(url)) - set(segs_before)
    seg = orthanc_instance(url, new_seg)
    assert [str(item.SeriesInstanceUID) for item in seg.ReferencedSeriesSequence] == [series_uid]
    result = pydicom_seg.MultiClassReader().read(seg)
    # The SEG's voxels sit where the label's did, in world millimetres (LPS).
    seg_voxels = np.argwhere(result.data > 0)[:, ::-1]  # (x, y, z) indices of the SEG's own grid
    seg_world = np.asarray(result.origin) + (seg_voxels * np.asarray(result.spacing)) @ np.asarray(
        result.direction).T
    label_world = nib.affines.apply_affine(served.affine, np.argwhere(label > 0)) * [-1, -1, 1]  # RAS -> LPS
    assert len(seg_world) == len(label_world) == 36
    np.testing.assert_allclose(np.sort(seg_world, axis=0), np.sort(label_world, axis=0), atol=1e-3)
    assert requests.get(f"{server}/datastore/", timeout=60).json()["completed"] == 1


def test_a_label_that_cannot_be_stored_never_reaches_the_pacs(pacs, server, tmp_path):
    url, series_uid, _, _ = pacs
    served = served_image(server, series_uid, tmp_path)
    segs_before = seg_series(url)
    save_nifti(np.zeros(served.shape, np.uint8), served.affine, tmp_path / "empty.nii.gz")
    response = put_final_label(server, series_uid, tmp_path / "empty.nii.gz")
    assert response.status_code == 422 and "label is empty" in response.json()["detail"]

    (tmp_path / "label.bin").write_bytes(bytes(served.shape[0] * served.shape[1]))  # one slice's worth
    response = put_final_label(server, series_uid, tmp_path / "label.bin")
    assert response.status_code == 422, response.text
    assert f"label.bin holds {served.shape[0] * served.shape[1]} voxels" in response.json()["detail"]
    assert seg_series(url) == segs_before


def test_labels_and_scores_outlast_a_restart(pacs, server, cache, tmp_path):
    url, series_uid, _, _ = pacs
    requests.put(f"{server}/datastore/image/info", params={"image": series_uid},
                 data={"info": json.dumps({"cross_prompt_disagreement": 0.42})}, timeout=30)
    with running_server(f"{url}/dicom-web", [("dicomweb_cache", cache)], tmp_path) as restarted:
        info = requests.get(f"{restarted}/datastore/image/info", params={"image": series_uid}, timeout=30).json()
        assert info.get("cross_prompt_disagreement") == 0.42
        assert requests.get(f"{restarted}/datastore/", timeout=60).json()["completed"] == 1


def test_an_unreachable_pacs_is_a_clear_error_and_the_server_keeps_answering(tmp_path):
    dead = f"http://127.0.0.1:{free_port()}/dicom-web"
    with running_server(dead, [("dicomweb_cache", tmp_path / "cache")], tmp_path) as server_url:
        status = requests.get(f"{server_url}/info/", timeout=30).json()["datastore"]
        assert "cannot be reached" in status["error"]
        params = {"foreground": [[1, 1, 1]]}
        response = requests.post(f"{server_url}/infer/suv_threshold", params={"image": "1.2.3", "output": "json"},
                                 data={"params": json.dumps(params)}, timeout=60)
        assert response.status_code == 502 and "cannot be reached" in response.json()["detail"]
