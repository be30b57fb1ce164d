"""OHIF v3, as MONAI Label bundles it, in headless Chromium: a PET study from Orthanc, the MONAI Label panel
connected to this server (signed in with a token), a click on the scan under Point Prompts, and the 3D SAM's mask
back in the viewer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from urllib.parse import parse_qs

import numpy as np
import pydicom
import pydicom_seg
import pytest

from segany_pet.label.access import add_account
from segany_pet.pet import nrrd_from_label_box
from segany_pet.phantom.dicom import write_pet_series
from support import (
    orthanc_instance,
    read_nrrd,
    running_orthanc,
    running_server,
    seg_series,
    small_scan,
    upload_to_orthanc,
)

pytestmark = [pytest.mark.server, pytest.mark.slow]

CHROMIUM = "/usr/bin/chromium"
# Headless, offline, no first-run or background traffic (see the MONAI Label reference notes).
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def form_params(post_data: bytes) -> dict:
    """The ``params`` field of OHIF's multipart infer request."""
    text = post_data.decode("utf-8", errors="replace")
    if "name=\"params\"" in text:
        part = text.split('name="params"', 1)[1].split("\r\n\r\n", 1)[1]
        return json.loads(part.split("\r\n--", 1)[0])
    return json.loads(parse_qs(text)["params"][0])


def test_a_click_in_ohif_returns_a_mask_into_the_viewer(tmp_path):
    """With sign-in on, as a lab runs it: the annotator types their token once and the viewer sends it."""
    sync_api = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists() or shutil.which("Orthanc", path="/usr/sbin") is None:
        pytest.skip("Debian's chromium and orthanc are needed (scripts/setup.sh installs them)")
    volume, _, _ = small_scan(7, "fdg", size=(64, 64, 48))
    study_uid = pydicom.uid.generate_uid()
    files = write_pet_series(volume.suv, volume.affine, tmp_path / "series", study_uid=study_uid)
    with running_orthanc(tmp_path) as pacs:
        upload_to_orthanc(pacs, files)
        token = add_account(tmp_path / "tokens.json", "annotator", "annotator")
        conf = [("dicomweb_cache", tmp_path / "cache"), ("auth_tokens", tmp_path / "tokens.json")]
        headers = {"Authorization": f"Bearer {token}"}
        with running_server(f"{pacs}/dicom-web", conf, tmp_path, headers=headers) as server, \
                sync_api.sync_playwright() as driver:
            browser = driver.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 900})
                prompts = []
                page.on("dialog", lambda dialog: (prompts.append(dialog.message), dialog.accept(token)))
                page.goto(f"{server}/ohif/monai-label?StudyInstanceUIDs={study_uid}")
                page.locator("canvas.cornerstone-canvas").first.wait_for(timeout=60_000)
                page.wait_for_timeout(3000)  # the volume streams in
                banner = page.get_by_text("Confirm and Hide")
                if banner.count():
                    banner.click()
                page.fill("#monailabelServerURL", f"{server}/")
                with page.expect_response(lambda r: r.url.startswith(f"{server}/info"), timeout=60_000) as info:
                    page.locator(".settingsTable button.actionButton").first.click()
                assert info.value.status == 200
                page.locator("label.tab-label", has_text="Point Prompts").click()
                page.locator("td:text-is('lesion')").first.click()
                canvas = page.locator("canvas.cornerstone-canvas").first
                box = canvas.bounding_box()
                middle = {"x": box["width"] / 2, "y": box["height"] / 2}
                canvas.click(position=middle)  # the first click on an inactive viewport only activates it
                page.wait_for_timeout(500)
                canvas.click(position=middle)
                page.wait_for_timeout(500)
                with page.expect_response(lambda r: "/infer/" in r.url, timeout=180_000) as inferred:
                    page.locator("button[title='Run PointPrompts']").click()
                response = inferred.value
                assert response.status == 200, response.text()
                assert prompts == ["SegAnyPET Label: your access token"]  # asked once, before the viewer started
                assert response.request.all_headers()["authorization"] == f"Bearer {token}"
                assert "/infer/segany_pet?" in response.url
                params = form_params(response.request.post_data_buffer)
                assert len(params["foreground"]) >= 1 and params["result_extension"] == ".nrrd"
                # The project's add-on asked for the mask's box alone and filled the whole file in for the panel.
                assert params["label_box"] is True
                box = response.headers["x-label-box"]
                assert len(response.body()) < np.prod(volume.shape) / 10
                assert page.evaluate("window.seganyPetLabelBoxReplies") == 1
                header, mask = read_nrrd(nrrd_from_label_box(response.body(), box))
                click = params["foreground"][-1]
                print(f"OHIF click at voxel {click}: mask of {int(mask.sum())} voxels")
                assert mask.shape == volume.shape and mask[tuple(click)] > 0  # the clicked object, on the PET grid
                page.wait_for_timeout(3000)  # the viewer draws the labelmap
                page.screenshot(path=tmp_path / "ohif_point_prompt.png")
                print(f"screenshot: {tmp_path / 'ohif_point_prompt.png'}")

                # The project's Save label button stores the panel's segmentation in the PACS as DICOM-SEG.
                save_button = page.locator("#segany-pet-save-label")
                with page.expect_response(lambda r: "/datastore/label" in r.url, timeout=120_000) as saved:
                    save_button.click()
                assert saved.value.request.method == "PUT" and saved.value.status == 200, saved.value.text()
                series_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
                assert f"image={series_uid}" in saved.value.url
                (seg_uid,) = seg_series(pacs)
                seg = orthanc_instance(pacs, seg_uid)
                assert [str(item.SeriesInstanceUID) for item in seg.ReferencedSeriesSequence] == [series_uid]
                # The SEG holds the mask the click drew, voxel for voxel, in world millimetres (LPS).
                stored = pydicom_seg.MultiClassReader().read(seg)
                seg_voxels = np.argwhere(stored.data > 0)[:, ::-1]  # (x, y, z) of the SEG's own grid
                seg_world = np.asarray(stored.origin) + (seg_voxels * np.asarray(stored.spacing)) @ np.asarray(
                    stored.direction).T
                directions = np.asarray(header["space directions"], dtype=float)  # the reply's grid, RAS
                mask_world = (np.argwhere(mask > 0) @ directions + header["space origin"]) * [-1, -1, 1]
                print(f"saved from OHIF: DICOM-SEG {seg_uid} of {len(seg_world)} voxels")
                assert len(seg_world) == len(mask_world)
                np.testing.assert_allclose(np.sort(seg_world, axis=0), np.sort(mask_world, axis=0), atol=1e-3)
                page.wait_for_function("document.getElementById('segany-pet-save-label').dataset.lastResult")
                assert save_button.get_attribute("data-last-result").startswith("success")
            finally:
                browser.close()
