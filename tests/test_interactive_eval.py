"""The interactive benchmark: per-lesion clicks, the autoPET IV protocol, baselines on the same lesions, reports."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from segany_pet.evaluate.interactive import (
    autopet_iv_clicks,
    corrective_click,
    evaluate_autopet_iv,
    evaluate_baselines,
    evaluate_case,
    touches_from_organs,
)
from segany_pet.evaluate.report import case_bootstrap_interval, markdown_table, summarise, write_report
from segany_pet.model import build_model
from segany_pet.pet import PETVolume
from segany_pet.predictor import Predictor
from segany_pet.prompts import centre_click
from segany_pet.segment import METHODS
from support import TINY

TOUCHES = {1: None, 2: "bladder", 3: None}


def _ball(shape, centre, radius) -> np.ndarray:
    grid = np.indices(shape).transpose(1, 2, 3, 0)
    return np.linalg.norm(grid - np.asarray(centre), axis=-1) <= radius


@pytest.fixture(scope="module")
def scene():
    """A 4 mm volume with three hot lesions (ids 1..3), lesion 2 against a hot 'bladder'."""
    shape = (40, 40, 48)
    rng = np.random.default_rng(0)
    suv = rng.gamma(8.0, 1 / 8.0, size=shape).astype(np.float32)
    truth = np.zeros(shape, np.int16)
    organs = np.zeros(shape, np.uint8)
    bladder = _ball(shape, (28, 20, 12), 5)
    organs[bladder] = 14
    suv[bladder] = 12.0
    for lesion_id, (centre, radius) in enumerate((((10, 10, 30), 3), ((28, 20, 19), 2.5), ((12, 30, 10), 2)), 1):
        ball = _ball(shape, centre, radius) & ~bladder
        truth[ball] = lesion_id
        suv[ball] = 9.0
    affine = np.diag([4.0, 4.0, 4.0, 1.0])
    return PETVolume(suv, affine), truth, organs


class GroundTruthOracle:
    """NOT a model: answers a prompt with the ground-truth lesions under its foreground clicks (``perfect``) or
    with nothing. It only exists to check the evaluation arithmetic; models are scored through `Predictor`."""

    def __init__(self, truth: np.ndarray, perfect: bool = True):
        self.truth, self.perfect = truth, perfect

    def set_volume(self, volume, volume_id=None):
        return self

    def predict(self, foreground=(), background=(), box=None, previous=None, edge=None):
        clicks = [*(previous.foreground if previous else ()), *(tuple(c) for c in foreground)]
        ids = {int(self.truth[c]) for c in clicks} - {0}
        mask = np.isin(self.truth, list(ids)) if self.perfect else np.zeros(self.truth.shape, bool)
        return SimpleNamespace(mask=mask.astype(np.uint8), iou=1.0, foreground=clicks)


def test_corrective_click_goes_to_the_deepest_voxel_of_the_largest_error():
    truth = np.zeros((20, 20, 20), bool)
    truth[2:12, 2:12, 2:12] = True
    prediction = truth.copy()
    prediction[2:12, 2:12, 2:5] = False  # missed slab, 300 voxels
    prediction[14:17, 14:17, 14:17] = True  # leak, 27 voxels
    voxel, positive = corrective_click(prediction, truth)
    assert positive and not prediction[voxel] and truth[voxel] and voxel[2] in (3,)
    voxel, positive = corrective_click(prediction, truth, ignore=~prediction & truth)
    assert not positive and voxel == (15, 15, 15)
    assert corrective_click(prediction, truth, taken=[(15, 15, 15)], ignore=~prediction & truth)[0] != (15, 15, 15)
    assert corrective_click(truth, truth) is None


def test_perfect_and_empty_answers_score_one_and_zero(scene):
    volume, truth, _ = scene
    perfect = evaluate_case(GroundTruthOracle(truth), volume, truth, clicks=5, touches=TOUCHES, volume_id="scene")
    assert [row["lesion"] for row in perfect["lesions"]] == [1, 2, 3]
    assert all(row["dice"] == [1.0] * 5 for row in perfect["lesions"])
    assert (perfect["dice"], perfect["fpv_ml"], perfect["fnv_ml"]) == (1.0, 0.0, 0.0)
    assert [row["group"] for row in perfect["lesions"]] == ["isolated", "touching", "isolated"]
    assert perfect["lesions"][0]["clicks"][0][:3] == centre_click(truth == 1, volume.spacing)

    empty = evaluate_case(GroundTruthOracle(truth, perfect=False), volume, truth, clicks=3)
    assert all(row["dice"] == [0.0] * 3 for row in empty["lesions"])
    assert all([c[3] for c in row["clicks"]] == [1, 1, 1] for row in empty["lesions"])  # each click a correction
    assert empty["fnv_ml"] == pytest.approx((truth > 0).sum() * volume.voxel_volume_ml)
    assert empty["fpv_ml"] == 0.0 and empty["dice"] == 0.0
    assert {row["group"] for row in empty["lesions"]} == {"unknown"}


def test_real_predictor_runs_the_protocol(scene):
    volume, truth, _ = scene
    torch.manual_seed(0)
    predictor = Predictor(build_model(TINY), max_windows=1)
    result = evaluate_case(predictor, volume, truth, clicks=3, touches=TOUCHES, lesion_ids=[1, 2])
    assert [row["lesion"] for row in result["lesions"]] == [1, 2]
    for row in result["lesions"]:
        assert len(row["dice"]) == 3 and all(0.0 <= d <= 1.0 for d in row["dice"])
        assert 1 <= len(row["clicks"]) <= 3 and len(row["iou_estimate"]) == len(row["clicks"])
        assert all(all(0 <= v < n for v, n in zip(c[:3], volume.shape, strict=True)) for c in row["clicks"])
    assert result["fpv_ml"] >= 0 and result["fnv_ml"] >= 0


def test_touches_from_an_organ_map(scene):
    _, truth, organs = scene
    assert touches_from_organs(truth, organs, {14: "bladder"}) == TOUCHES


def test_autopet_iv_clicks_and_steps(scene):
    volume, truth, organs = scene
    lesion_clicks, background = autopet_iv_clicks(volume.suv, truth > 0, volume.spacing, seed=3)
    assert len(lesion_clicks) == 10 and len({v for v, _ in lesion_clicks}) == 10
    assert all(truth[v] > 0 for v, _ in lesion_clicks)
    assert {c for _, c in lesion_clicks[:3]} == {1, 2, 3}  # every component clicked at its centre first
    assert background and all(truth[v] == 0 and volume.suv[v] >= 9.0 for v in background)
    assert organs[background[0]] == 14  # the bladder: the largest hot component comes first

    result = evaluate_autopet_iv(GroundTruthOracle(truth), volume, truth, seed=3)
    assert len(result["dice"]) == 11 and result["dice"][0] == 0.0 and result["dice"][3:] == [1.0] * 8
    assert result["fnv_ml"][0] > 0 and result["fnv_ml"][-1] == 0.0 and set(result["fpv_ml"]) == {0.0}
    dices = result["dice"]
    assert result["auc_dice"] == pytest.approx(sum((a + b) / 2 for a, b in zip(dices, dices[1:], strict=False)))

    torch.manual_seed(0)
    real = evaluate_autopet_iv(Predictor(build_model(TINY), max_windows=1), volume, truth, steps=3)
    assert len(real["dice"]) == 3 and real["dice"][0] == 0.0


def test_baselines_give_one_row_per_lesion_and_method(scene):
    volume, truth, _ = scene
    rows = evaluate_baselines(volume, truth, touches=TOUCHES, case_id="scene")
    assert len(rows) == 3 * len(METHODS)
    assert {(r["lesion"], r["method"]) for r in rows} == {(i, m) for i in (1, 2, 3) for m in METHODS}
    isolated = [r for r in rows if r["method"] == "relative_41" and r["group"] == "isolated"]
    assert all(r["dice"] > 0.9 for r in isolated)  # a uniform hot ball is what a 41% threshold gets right
    assert all(r["case_fpv_ml"] >= 0 and r["case"] == "scene" for r in rows)


def test_the_one_click_interval_resamples_whole_cases():
    assert case_bootstrap_interval([[0.8, 0.8], [0.8]]) == [0.8, 0.8]
    assert case_bootstrap_interval([[0.5, 0.9]]) is None  # one case: nothing to resample
    low, high = case_bootstrap_interval([[0.2, 0.3], [0.9], [0.6, 0.7, 0.8], [0.4]])
    assert 0.2 < low < 0.59 < high < 0.9  # around the mean over lesions, 0.5875
    narrow = case_bootstrap_interval([[0.55, 0.6], [0.6], [0.6, 0.6, 0.65], [0.6]])
    assert narrow[1] - narrow[0] < (high - low) / 4

    cases = [{"lesions": [{"dice": [d], "group": "isolated"} for d in dices], "dice": 1.0, "fpv_ml": 0.0, "fnv_ml": 0.0}
             for dices in ([0.2, 0.3], [0.9], [0.6, 0.7, 0.8], [0.4])]
    summary = summarise(cases)
    assert summary["model"]["all"]["dice_1click_ci95"] == [low, high]
    assert summary["model"]["touching"]["dice_1click_ci95"] is None
    assert f"all {low:.3f}-{high:.3f}; isolated {low:.3f}-{high:.3f}." in markdown_table(summary)


def test_report_tables_and_plot(tmp_path, scene):
    volume, truth, _ = scene
    model_cases = [evaluate_case(GroundTruthOracle(truth), volume, truth, clicks=5, touches=TOUCHES, volume_id="a")]
    baselines = evaluate_baselines(volume, truth, touches=TOUCHES, case_id="a")
    autopet = [evaluate_autopet_iv(GroundTruthOracle(truth), volume, truth)]
    summary = summarise(model_cases, baselines, autopet)
    assert summary["model"]["touching"]["n"] == 1 and summary["model"]["all"]["dice_at"] == {"1": 1, "3": 1, "5": 1}
    assert summary["best_baseline"] in METHODS and summary["margin_over_best_baseline_1click"] >= 0
    paths = write_report(summary, tmp_path, details={"cases": model_cases})
    text = paths["markdown"].read_text()
    assert "| touching (1) |" in text and "autoPET IV" in text and "relative_41" in text
    assert summary["model"]["all"]["dice_1click_ci95"] is None and "95% interval" not in text  # one case
    assert json.loads(paths["json"].read_text())["summary"]["lesions"] == 3
    pytest.importorskip("matplotlib")
    assert paths["plot"].stat().st_size > 1000
