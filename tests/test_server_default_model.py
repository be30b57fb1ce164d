"""The shipped default model through a live server: an annotator's click-to-3D-mask loop on demo lesions.

Unlike test_server_sam.py (random weights, the serving path), these tests check what the annotator sees:
masks that match the lesions, and a second click that fixes a hard case.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import requests
from requests_toolbelt.multipart.decoder import MultipartDecoder

from segany_pet.evaluate.interactive import corrective_click
from segany_pet.evaluate.metrics import dice
from support import LARGE_SCAN, case_truth, read_nrrd, running_server

pytestmark = pytest.mark.server

MODEL = "segany_pet"


@pytest.fixture(scope="module")
def default_server(cohort, tmp_path_factory) -> str:
    """The server as the README starts it: no model conf, so the shipped model/segany_pet_small.pt, and scans
    warmed for clicks (the default, which the other test servers turn off)."""
    with running_server(cohort / "images", [("prewarm", "true")], tmp_path_factory.mktemp("default_server")) as url:
        yield url


def click(server, case, client_id, foreground=(), background=(), reset=False) -> tuple[np.ndarray, dict]:
    params = {"foreground": [list(map(int, v)) for v in foreground],
              "background": [list(map(int, v)) for v in background],
              "client_id": client_id, "reset": reset, "result_extension": ".nrrd", "result_dtype": "uint8",
              "result_compress": False}
    response = requests.post(f"{server}/infer/{MODEL}", params={"image": case, "output": "all"},
                             data={"params": json.dumps(params)}, timeout=120)
    assert response.status_code == 200, response.text
    parts = {
        part.headers[b"Content-Disposition"].split(b'name="')[1].split(b'"')[0]: part.content
        for part in MultipartDecoder(response.content, response.headers["Content-Type"]).parts
    }
    _, mask = read_nrrd(parts[b"image"])
    return mask, json.loads(parts[b"params"])


def lesions_of(cohort) -> list[tuple[str, dict, np.ndarray]]:
    found = []
    for json_path in sorted((cohort / "truth").glob("*.json")):
        info, instances = case_truth(cohort, json_path.stem)
        found += [(json_path.stem, lesion, instances == lesion["id"]) for lesion in info["lesions"]]
    return found


def test_info_reports_the_shipped_model_ready(default_server):
    served = requests.get(f"{default_server}/info/", timeout=10).json()["models"][MODEL]["model"]
    assert served["file"].endswith("model/segany_pet_small.pt")
    assert served["state"] in ("ready", "loading") and served.get("preset", "segany_pet_small") == "segany_pet_small"
    assert served.get("crop_spacings_mm", [1.5, 1.25]) == [1.5, 1.25]  # the scale ensemble of the file's preset


def test_a_fetched_scan_is_warmed_so_a_click_on_its_lesion_finds_its_crops_encoded(default_server):
    # The autoPET-sized scan (one hot sphere at its centre): nothing else in this module clicks on it.
    response = requests.get(f"{default_server}/datastore/image", params={"image": LARGE_SCAN}, timeout=60)
    assert response.status_code == 200
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        warm_up = requests.get(f"{default_server}/info/", timeout=10).json().get("prewarm", {})
        if warm_up.get("image", "").startswith(LARGE_SCAN) and warm_up.get("finished"):
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"the scan was not warmed within 120 s: {warm_up}")
    assert 0 < warm_up["crops_encoded"] <= warm_up["crops_planned"]
    _, reply = click(default_server, LARGE_SCAN, "warmed", [[200, 200, 163]])
    assert reply["cache_hit"] is True and reply["latencies"]["encode"] == 0


def test_one_click_on_each_demo_lesion_returns_its_3d_mask(default_server, cohort):
    scores = []
    for case, lesion, truth in lesions_of(cohort):
        mask, reply = click(default_server, case, f"lesion-{case}-{lesion['id']}", [lesion["centre_voxel"]])
        score = dice(mask > 0, truth)
        scores.append((score, lesion["touches"]))
        total = reply["quantification"]["total"]
        print(f"{case} lesion {lesion['id']:2d} {lesion['volume_ml']:5.1f} mL touches {lesion['touches'] or '-':13s}"
              f" Dice {score:.3f}, IoU estimate {reply['iou']:.2f}, MTV {total['mtv_ml']} mL, SUVmax {total['suvmax']}")
        # The floor catches a mask that misses (or drops) its lesion; the hardest demo lesion (4.3 mL against
        # the right kidney, SUV 2.6 at its centre) gives 0.149 with the shipped model (7 of its 67 voxels), 0.196
        # and 0.239 with the two before; v9 and v12 returned the 15 mL prostate lesion under the bladder empty.
        assert score > 0.1, f"{case} lesion {lesion['id']}: the mask misses the clicked lesion (Dice {score:.3f})"
        # A mask that leaves the click out must say so: the annotator is told to click beside it or draw a box.
        assert mask[tuple(lesion["centre_voxel"])] or any("leaves out the foreground click" in note
                                                           for note in reply["notes"]), reply["notes"]
    mean = np.mean([score for score, _ in scores])
    print(f"mean Dice after one click over {len(scores)} lesions: {mean:.3f}")
    assert mean > 0.7  # shipped model 0.758, the two before 0.744 and 0.741


def test_a_second_click_improves_a_lesion_touching_the_bladder(default_server, cohort):
    beside = [(case, lesion, truth) for case, lesion, truth in lesions_of(cohort) if lesion["touches"] == "bladder"]
    assert beside, "the test cohort has no lesion touching the bladder: change its seed"
    # The hard case: the one a first click gets least right.
    first_dice = [dice(click(default_server, case, "survey", [lesion["centre_voxel"]], reset=True)[0] > 0, truth)
                  for case, lesion, truth in beside]
    case, lesion, truth = beside[int(np.argmin(first_dice))]
    first, _ = click(default_server, case, "second-click", [lesion["centre_voxel"]], reset=True)
    voxel, positive = corrective_click(first, truth, taken=[tuple(lesion["centre_voxel"])])
    second, reply = click(default_server, case, "second-click", *(([voxel], []) if positive else ([], [voxel])))
    before, after = dice(first > 0, truth), dice(second > 0, truth)
    print(f"{case} lesion {lesion['id']} ({lesion['volume_ml']:.1f} mL, touches the bladder): Dice {before:.3f} "
          f"after one click, {after:.3f} after a {'positive' if positive else 'negative'} click at {voxel}")
    assert reply["clicks"]["foreground"] + reply["clicks"]["background"] == 2
    assert after > before
