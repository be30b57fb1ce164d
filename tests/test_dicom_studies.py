"""DICOM PET series in a studies folder: converted to SUV once, served beside NIfTI, refusals reported."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import requests
from monailabel.client import MONAILabelClient

from segany_pet.label.datastore import PETDatastore
from segany_pet.label.dicom_studies import REPORT, import_dicom_series, summary
from segany_pet.pet import load_nifti, save_nifti
from segany_pet.pet.dicom_files import series_folders
from segany_pet.phantom.dicom import write_pet_series
from support import running_server, small_scan, wait_for


@pytest.fixture()
def studies(tmp_path):
    """Two good PET series in nested folders, one without decay correction, one NIfTI image."""
    folder = tmp_path / "studies"
    volume, _, _ = small_scan(3, size=(40, 36, 30))
    write_pet_series(volume.suv, volume.affine, folder / "patient01" / "PET_WB")
    write_pet_series(volume.suv[::-1].copy(), volume.affine, folder / "patient02" / "PET", vendor="ge")
    write_pet_series(volume.suv, volume.affine, folder / "patient03" / "PET", decay_correction="NONE")
    save_nifti(volume.suv, volume.affine, folder / "nifti_scan.nii.gz")
    return folder


def test_series_are_converted_once_and_refusals_reported(studies):
    assert [p.relative_to(studies).as_posix() for p in series_folders(studies)] == [
        "patient01/PET_WB", "patient02/PET", "patient03/PET"]
    datastore = PETDatastore(str(studies), extensions=("*.nii.gz", "*.nii"), auto_reload=False)
    state = studies / ".segany_pet"
    report = import_dicom_series(datastore, studies, state)
    assert sorted(datastore.list_images()) == ["nifti_scan", "patient01__PET_WB", "patient02__PET"]
    original = load_nifti(studies / "nifti_scan.nii.gz")
    converted = load_nifti(datastore.get_image_uri("patient01__PET_WB"))
    # The same SUVs at the same world positions (the reader orders slices along the DICOM normal, which may
    # run against the NIfTI's k axis), to int16 storage precision.
    to_original = np.linalg.inv(original.affine) @ converted.affine
    np.testing.assert_allclose(np.abs(to_original[:3, :3]), np.eye(3), atol=1e-4)
    voxels = np.indices(converted.shape).reshape(3, -1)
    mapped = np.rint(to_original[:3, :3] @ voxels + to_original[:3, 3:]).astype(int)
    np.testing.assert_allclose(converted.suv.reshape(-1), original.suv[tuple(mapped)], rtol=5e-3, atol=1e-3)
    info = datastore.get_image_info("patient01__PET_WB")
    assert info["source"] == "dicom" and info["suv_conversion"]["units"] == "BQML" and info["suv_factor"] > 0
    refused = report["patient03/PET"]
    assert refused["status"] == "error" and "DecayCorrection (0054,1102)" in refused["message"]
    assert "patient03/PET" in summary(state)["refused"] and summary(state)["converted"] == 2

    modified = datastore.get_image_info("patient01__PET_WB")["ts"]
    assert import_dicom_series(datastore, studies, state) == report  # nothing converted again
    assert datastore.get_image_info("patient01__PET_WB")["ts"] == modified
    a_file = next((studies / "patient02" / "PET").iterdir())
    os.utime(a_file, ns=(a_file.stat().st_atime_ns, a_file.stat().st_mtime_ns + 10**9))
    again = import_dicom_series(datastore, studies, state)
    assert again["patient02/PET"]["stamp"] != report["patient02/PET"]["stamp"]
    assert json.loads((state / REPORT).read_text()) == again


@pytest.mark.server
@pytest.mark.slow
def test_the_server_serves_dicom_series_as_suv_images(studies, tmp_path):
    with running_server(studies, [], tmp_path) as url:
        client = MONAILabelClient(url)
        wait_for(lambda: {"patient01__PET_WB", "patient02__PET"} <= set(client.datastore()["objects"]),
                 timeout=120, what="the DICOM series to be converted")
        # The series go in order; the refusal of patient03 is reported once the import reaches it.
        wait_for(lambda: "patient03/PET" in client.info()["dicom_import"]["refused"], timeout=60,
                 what="the series without decay information to be refused")
        params = {"foreground": [[20, 18, 15]], "background": []}
        response = requests.post(f"{url}/infer/suv_threshold", params={"image": "patient01__PET_WB",
                                                                        "output": "json"},
                                 data={"params": json.dumps(params)}, timeout=60)
        assert response.status_code == 200, response.text
        assert response.json()["quantification"]["total"]["suvmax"] > 0
