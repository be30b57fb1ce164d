"""The app served by a real MONAI Label server subprocess, driven as OHIF, Slicer and the Python client do."""

from __future__ import annotations

import json
import zlib

import nibabel as nib
import numpy as np
import pytest
import requests
from backports import zstd
from monailabel.client import MONAILabelClient

from segany_pet.evaluate.metrics import lesion_dice
from segany_pet.label.infer import OHIF_RESULT_PARAMS
from support import BAD_IMAGES, case_truth, read_nrrd

pytestmark = pytest.mark.server

MODEL = "suv_threshold"


@pytest.fixture(scope="module")
def isolated_lesion(cohort):
    """The largest well-contrasted lesion outside organs, in the first case that has one."""
    for json_path in sorted((cohort / "truth").glob("*.json")):
        case = json_path.stem
        info, instances = case_truth(cohort, case)
        isolated = [
            lesion
            for lesion in info["lesions"]
            if not lesion["touches"] and lesion["site"] in ("lymph node", "bone", "lung") and lesion["suvmax"] >= 5
        ]
        if isolated:
            lesion = max(isolated, key=lambda item: item["volume_ml"])
            return case, lesion, instances
    pytest.fail("the test cohort has no isolated lesion of 1 mL or more: change its seed")


def ohif_infer(server, image, params, output="image"):
    return requests.post(
        f"{server}/infer/{MODEL}", params={"image": image, "output": output}, data={"params": params}, timeout=60
    )


def test_info_lists_the_threshold_model(server):
    info = MONAILabelClient(server).info()
    model = info["models"][MODEL]
    assert model["type"] == "deepgrow"
    assert model["labels"] == {"lesion": 1}
    assert model["config"]["method"][0] == "relative_41"
    assert set(model["config"]["method"]) == {"relative_41", "relative_50", "sized_41", "fixed_2.5", "fixed_4.0"}
    assert model["config"]["saddle_cut"] is False


def test_datastore_lists_every_image(server, cohort):
    objects = MONAILabelClient(server).datastore()["objects"]
    expected = {path.name.removesuffix(".nii.gz") for path in (cohort / "images").glob("*.nii.gz")}
    assert set(objects) == expected


def test_next_sample_serves_an_image_of_the_datastore(server, cohort):
    client = MONAILabelClient(server)
    ids = set(client.datastore()["objects"])
    for strategy in ("first", "random"):
        assert client.next_sample(strategy, {})["id"] in ids


def test_ohif_click_returns_nrrd_on_the_image_grid(server, cohort, isolated_lesion):
    case, lesion, instances = isolated_lesion
    params = {"foreground": [lesion["centre_voxel"]], "background": [], **OHIF_RESULT_PARAMS}
    response = ohif_infer(server, case, json.dumps(params))
    assert response.status_code == 200, response.text

    header, mask = read_nrrd(response.content)
    image = nib.load(cohort / "images" / f"{case}.nii.gz")
    assert mask.shape == image.shape and mask.dtype == np.uint8
    np.testing.assert_allclose(np.array(header["space directions"]).T, image.affine[:3, :3], atol=1e-4)
    np.testing.assert_allclose(header["space origin"], image.affine[:3, 3], atol=1e-4)
    score = lesion_dice(mask, instances, lesion["id"])
    print(f"OHIF click on {case} lesion {lesion['id']} ({lesion['volume_ml']:.1f} mL): Dice {score:.3f}")
    assert score > 0.5


def test_large_replies_go_compressed_to_clients_that_accept_it(server, isolated_lesion):
    case, lesion, _ = isolated_lesion
    params = json.dumps({"foreground": [lesion["centre_voxel"]], "background": [], **OHIF_RESULT_PARAMS})
    replies = {}
    # Chromium's header, an older browser's, one refusing zstd by weight, and none
    for encoding in ("gzip, deflate, br, zstd", "gzip, deflate, br", "zstd;q=0, deflate", "identity"):
        response = requests.post(f"{server}/infer/{MODEL}", params={"image": case, "output": "image"},
                                 data={"params": params}, headers={"Accept-Encoding": encoding}, stream=True,
                                 timeout=60)
        assert response.status_code == 200
        wire = response.raw.read(decode_content=False)
        replies[encoding] = (response.headers.get("content-encoding"), wire)
    codings = [coding for coding, _ in replies.values()]
    assert codings == ["zstd", "deflate", "deflate", None]
    plain = replies["identity"][1]
    zstd_body, deflate_body = replies["gzip, deflate, br, zstd"][1], replies["gzip, deflate, br"][1]
    print(f"OHIF reply: {len(plain)} bytes raw, {len(zstd_body)} in zstd, {len(deflate_body)} in deflate")
    assert len(zstd_body) < len(plain) / 10 and len(deflate_body) < len(plain) / 10
    assert zstd.decompress(zstd_body) == plain
    assert zlib.decompress(deflate_body) == plain
    read_nrrd(plain)


def test_the_saddle_cut_separates_a_lesion_from_the_bladder(server, cohort, tmp_path):
    lesions = [
        (case_truth(cohort, path.stem), lesion)
        for path in sorted((cohort / "truth").glob("*.json"))
        for lesion in json.loads(path.read_text())["lesions"]
        if lesion["touches"] == "bladder"
    ]
    (case_info, instances), lesion = max(lesions, key=lambda item: item[1]["volume_ml"])
    client = MONAILabelClient(server, tmpdir=str(tmp_path))
    scores = {}
    for saddle_cut in (False, "true"):  # as JSON sends it, and as a string
        params = {"foreground": [lesion["centre_voxel"]], "saddle_cut": saddle_cut}
        label_path, reply = client.infer(MODEL, case_info["case_id"], params)
        assert reply["saddle_cut"] is (saddle_cut == "true")
        scores[reply["saddle_cut"]] = lesion_dice(np.asanyarray(nib.load(label_path).dataobj), instances, lesion["id"])
    print(f"41% from a click on a {lesion['volume_ml']:.1f} mL lesion touching the bladder: Dice {scores[False]:.3f},"
          f" with the saddle cut {scores[True]:.3f}")
    assert scores[True] > 0.7 and scores[True] > scores[False] + 0.2


def test_slicer_click_with_roi_and_pet_numbers(server, cohort, isolated_lesion, tmp_path):
    case, lesion, instances = isolated_lesion
    centre = lesion["centre_voxel"]
    roi = [value for c in centre for value in (c - 12, c + 12)]
    client = MONAILabelClient(server, tmpdir=str(tmp_path), client_id="slicer-test")
    params = {"foreground": [centre], "background": [], "roi": roi, "label": "lesion", "method": "relative_50"}
    label_path, reply = client.infer(MODEL, case, params)

    assert reply["label_names"] == {"lesion": 1} and reply["method"] == "relative_50"
    mask = np.asanyarray(nib.load(label_path).dataobj)
    inside = np.zeros(mask.shape, bool)
    inside[tuple(slice(max(c - 12, 0), c + 13) for c in centre)] = True
    assert mask.any() and not mask[~inside].any()

    suv = np.asanyarray(nib.load(cohort / "images" / f"{case}.nii.gz").dataobj)
    total = reply["quantification"]["total"]
    voxel_ml = 4.0**3 / 1000
    assert total["count"] == len(reply["quantification"]["lesions"]) >= 1
    assert total["mtv_ml"] == pytest.approx(mask.sum() * voxel_ml, rel=1e-3)
    assert total["suvmax"] == pytest.approx(float(suv[mask > 0].max()), rel=1e-3)
    assert total["tlg"] == pytest.approx(float(suv[mask > 0].mean()) * mask.sum() * voxel_ml, rel=1e-2)
    biggest = reply["quantification"]["lesions"][0]
    assert biggest["suvmean"] <= biggest["suvpeak"] <= biggest["suvmax"]
    assert set(reply["latencies"]) >= {"load", "segment", "quantify", "write", "total"}


def test_save_final_label_marks_the_image_labeled(server, cohort, isolated_lesion, tmp_path):
    case, _, instances = isolated_lesion
    image = nib.load(cohort / "images" / f"{case}.nii.gz")
    label_path = tmp_path / "final.nii.gz"
    nib.save(nib.Nifti1Image((instances > 0).astype(np.uint8), image.affine), label_path)
    client = MONAILabelClient(server)
    client.save_label(case, str(label_path), tag="final", params={"label_info": [{"name": "lesion", "idx": 1}]})
    labels = client.datastore()["objects"][case]["labels"]
    assert "final" in labels
    assert client.info()["datastore"]["completed"] >= 1


@pytest.mark.parametrize(
    ("params", "status", "words"),
    [
        ({"foreground": [[999, 0, 0]]}, 422, "outside"),
        ({"foreground": [[-1, 5, 5]]}, 422, "outside"),
        ({"foreground": []}, 422, "click"),
        ({}, 422, "click"),
        ({"foreground": "lesion please"}, 422, "list of [i, j, k]"),
        ({"foreground": [[1.5, "a", None]]}, 422, "whole voxel index"),
        ({"foreground": [[20, 20, 20]], "roi": [30, 10, 0, 5, 0, 5]}, 422, "roi"),
        ({"foreground": [[20, 20, 20]], "method": "otsu"}, 422, "method"),
        ({"foreground": [[20, 20, 20]], "saddle_cut": "maybe"}, 422, "saddle_cut must be true or false"),
        ({"foreground": [[20, 20, 20]], "saddle_cut": 1}, 422, "saddle_cut must be true or false"),
        ({"foreground": [[20, 20, 20]], "result_extension": ".png"}, 422, "result_extension"),
    ],
)
def test_bad_prompts_get_a_clear_4xx(server, isolated_lesion, params, status, words):
    case = isolated_lesion[0]
    response = ohif_infer(server, case, json.dumps(params), output="json")
    assert response.status_code == status, response.text
    assert words in response.json()["detail"]


def test_unknown_image_and_non_json_params(server, isolated_lesion):
    response = ohif_infer(server, "no_such_scan", json.dumps({"foreground": [[1, 1, 1]]}))
    assert response.status_code == 404 and "no_such_scan" in response.json()["detail"]

    response = ohif_infer(server, isolated_lesion[0], "{'foreground': [[1, 1, 1]]")
    assert response.status_code == 400 and "JSON" in response.json()["detail"]


@pytest.mark.parametrize("bad_image", BAD_IMAGES)
def test_bad_image_files_get_a_4xx_and_the_server_keeps_serving(server, bad_image):
    response = ohif_infer(server, bad_image, json.dumps({"foreground": [[4, 4, 4]]}))
    assert response.status_code == 422, response.text
    assert bad_image in response.json()["detail"]
    assert requests.get(f"{server}/info/", timeout=10).status_code == 200
