"""The label audit report: every labeled image ranked in the CSV, the most suspicious drawn on the page."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from segany_pet.active.audit import CSV_COLUMNS, write_audit
from segany_pet.active.scoring import score_datastore
from segany_pet.errors import UserInputError
from segany_pet.label.datastore import PETDatastore
from segany_pet.model import load_checkpoint
from segany_pet.pet import save_nifti
from segany_pet.predictor import Predictor
from segany_pet.report import VIEWS, ras_axes, to_ras
from support import REPO, small_scan

# Crops of 4 mm phantoms around a lesion with no hot organ inside: (seed, lesion index), few targets to score.
CROPS = {"clean_a": (5, 1), "over&<b>": (6, 2), "clean_c": (11, 1)}
CROP_SIZE = (48, 48, 64)


def add_labeled(datastore: PETDatastore, folder: Path, image_id: str, suv, label, affine, quality: str) -> None:
    save_nifti(suv, affine, folder / "image.nii.gz")
    datastore.add_image(image_id, str(folder / "image.nii.gz"), {})
    if label is not None:
        save_nifti(label.astype(np.uint8), affine, folder / "label.nii.gz")
        datastore.save_label(image_id, str(folder / "label.nii.gz"), "final", {"quality": quality})


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    return Predictor(load_checkpoint(REPO / "model" / "segany_pet_small.pt"), cache_size=4)


@pytest.fixture(scope="module")
def datastore(tmp_path_factory, predictor) -> PETDatastore:
    """Three scored labels (one over-segmented by 8 mm, low tier), one label saved after scoring, one on the wrong
    grid (scoring failed) and an unlabeled image."""
    root = tmp_path_factory.mktemp("audit")
    (root / "studies").mkdir()
    store = PETDatastore(str(root / "studies"), auto_reload=False)
    cases = {}
    for image_id, (seed, lesion) in CROPS.items():
        volume, lesions, _ = small_scan(seed, "fdg", CROP_SIZE, lesion)
        cases[image_id] = volume.suv, lesions, volume.affine
    for image_id, (suv, lesions, affine) in cases.items():
        label = ndimage.binary_dilation(lesions > 0, iterations=2) if image_id == "over&<b>" else lesions > 0
        add_labeled(store, root, image_id, suv, label, affine, "low" if image_id == "over&<b>" else "high")
    suv, lesions, affine = cases["clean_a"]
    add_labeled(store, root, "wrong_grid", suv, lesions > 0, affine, "high")
    # Replaced on disk behind the server's back (saving it through the datastore is refused).
    save_nifti(np.zeros((8, 8, 8), np.uint8), affine, store.get_label_uri("wrong_grid", "final"))
    add_labeled(store, root, "unlabeled", suv, None, affine, "high")
    score_datastore(store, predictor, predictor, "test-key", images=[*CROPS, "wrong_grid"])
    add_labeled(store, root, "labeled_later", suv, lesions > 0, affine, "high")
    return store


@pytest.fixture(scope="module")
def report(datastore, predictor, tmp_path_factory) -> dict[str, Path]:
    return write_audit(datastore, tmp_path_factory.mktemp("report"), predictor, top=2)


def read_rows(path: Path) -> tuple[list[str], list[dict]]:
    with open(path, newline="", encoding="utf-8") as file:
        reader = csv.DictReader(file)
        return reader.fieldnames, list(reader)


def test_csv_ranks_every_labeled_image_most_suspicious_first_then_the_unscored(report):
    columns, rows = read_rows(report["csv"])
    assert columns == list(CSV_COLUMNS)
    assert sorted(row["image_id"] for row in rows) == sorted([*CROPS, "wrong_grid", "labeled_later"])
    assert [int(row["rank"]) for row in rows] == list(range(1, len(rows) + 1))
    scored = rows[: len(CROPS)]
    assert all(row["status"] == "scored" and row["note"] == "" for row in scored)  # none changed since scoring
    scores = [float(row["label_noise_score"]) for row in scored]
    assert scores == sorted(scores, reverse=True)
    assert scored[0]["image_id"] == "over&<b>" and scored[0]["tier"] == "low"
    for row in scored:
        assert len(row["worst_voxel_ijk"].split()) == 3 and row["worst_kind"] in ("label", "hot_spot")
        assert float(row["worst_noise_score"]) >= 0 and int(row["label_components"]) >= 1
        assert Path(row["image_path"]).is_file() and Path(row["label_path"]).is_file()
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d", row["scored_at"])
    unscored = {row["image_id"]: row for row in rows[len(CROPS):]}
    assert unscored["wrong_grid"]["status"] == "error" and "shape" in unscored["wrong_grid"]["note"]
    assert unscored["labeled_later"]["status"] == "not scored"
    assert "segany-pet score" in unscored["labeled_later"]["note"]
    assert all(row["label_noise_score"] == "" and row["worst_voxel_ijk"] == "" for row in unscored.values())


def test_page_counts_escapes_and_shows_the_top_figures(report):
    page = report["html"].read_text(encoding="utf-8")
    counts = "<tr><td>6</td><td>5</td><td>3</td><td>1</td><td>1</td></tr>"  # images, labeled, scored, ...
    assert counts in page
    assert "over&amp;&lt;b&gt;" in page and "over&<b>" not in page
    figures = re.findall(r'<img src="([^"]+)"', page)
    assert len(figures) == 2
    assert all((report["html"].parent / figure).is_file() for figure in figures)
    assert "No model was given" not in page
    assert "wrong_grid" in page and "labeled_later" in page  # listed without a score, with the reason


def test_without_models_the_page_says_the_figures_show_the_label_only(datastore, tmp_path):
    paths = write_audit(datastore, tmp_path, top=1)
    page = paths["html"].read_text(encoding="utf-8")
    assert "No model was given" in page
    assert len(list(paths["figures"].glob("*.png"))) == 1


def test_nothing_to_audit_says_what_to_do(tmp_path):
    studies = tmp_path / "studies"
    studies.mkdir()
    with pytest.raises(UserInputError, match="no images"):
        write_audit(PETDatastore(str(studies), auto_reload=False), tmp_path / "out")
    store = PETDatastore(str(studies), auto_reload=False)
    suv = np.ones((8, 8, 8), np.float32)
    add_labeled(store, tmp_path, "unlabeled", suv, None, np.eye(4), "high")
    with pytest.raises(UserInputError, match="save labels first"):
        write_audit(store, tmp_path / "out")
    add_labeled(store, tmp_path, "labeled", suv, suv > 0, np.eye(4), "high")
    with pytest.raises(UserInputError, match="run scoring first"):
        write_audit(store, tmp_path / "out")


def test_views_put_the_head_up_and_the_patients_right_on_the_viewers_left():
    # Stored axes: 0 runs to the feet, 1 to the patient's right, 2 to the back (an unusual but valid order).
    affine = np.array([[0.0, 2.0, 0.0, 0.0], [0.0, 0.0, -2.0, 0.0], [-3.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    axes, reversed_axes = ras_axes(affine)
    assert axes == (1, 2, 0) and reversed_axes == (False, True, True)
    volume = np.zeros((20, 30, 40), np.float32)
    volume[1, 28, 2] = 1.0  # near the head, the patient's right, the front
    ras = to_ras(volume, axes, reversed_axes)
    xyz = [int(i) for i in np.unravel_index(np.argmax(ras), ras.shape)]
    assert xyz == [28, 37, 18]
    for view, (image_of, place, _) in VIEWS.items():
        image = image_of(ras, xyz)  # rows bottom-up: the head and the front at the top
        row, column = np.unravel_index(np.argmax(image), image.shape)
        assert (column, row) == place(xyz, ras.shape)
        assert column < image.shape[1] // 2, view  # the patient's right (and front) on the viewer's left
        assert row >= image.shape[0] // 2, view  # the head (axial: the front) up


def test_a_label_file_gone_since_scoring_is_flagged_and_the_report_still_written(tmp_path):
    studies = tmp_path / "studies"
    studies.mkdir()
    store = PETDatastore(str(studies), auto_reload=False)
    suv = np.ones((16, 16, 16), np.float32)
    for image_id in ("kept", "gone $x$"):
        add_labeled(store, tmp_path, image_id, suv, suv > 1, np.diag([4.0, 4.0, 4.0, 1.0]), "high")
        store.update_image_info(image_id, {"label_noise_score": 0.5 if image_id == "kept" else 0.2,
                                           "cross_prompt_disagreement": 0.1, "cross_prompt_ts": 1_700_000_000,
                                           "targets": {"label": 0, "hot_spot": 0}, "label_noise_worst": []})
    Path(store.get_label_uri("gone $x$", "final")).unlink()
    paths = write_audit(store, tmp_path / "out")
    _, rows = read_rows(paths["csv"])
    assert [row["image_id"] for row in rows] == ["kept", "gone $x$"]
    assert all(row["note"] == "image or label changed since scoring: score again" for row in rows)  # no key
    page = paths["html"].read_text(encoding="utf-8")
    assert "no figure: label of gone $x$ cannot be read" in page
    assert "the axial slice is through the hottest voxel" in page
    assert [p.name for p in paths["figures"].glob("*.png")] == ["001_kept.png"]
