"""segany-pet curate: four source layouts into one datastore, every check, idempotent re-runs, recovery, report."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import requests
import yaml
from monailabel.client import MONAILabelClient
from monailabel.datastore.utils.convert import nifti_to_dicom_seg

from segany_pet.curate import TARGETS, curate, load_config
from segany_pet.curate.importer import JOURNAL, QC_DIR, STAGING_DIR, STATE
from segany_pet.curate.report import write_report
from segany_pet.errors import UserInputError
from segany_pet.label.datastore import PETDatastore
from segany_pet.pet import save_nifti
from segany_pet.phantom.dicom import write_pet_series
from segany_pet.train.data import records_from_datastore
from support import running_server, small_scan

SIZE = (36, 36, 44)
LESION = TARGETS["lesion"]


def scans() -> list[tuple]:
    return [small_scan(seed, tracer, SIZE) for seed, tracer in ((3, "fdg"), (4, "psma"), (5, "fdg"), (6, "psma"))]


def lps(volume) -> tuple[np.ndarray, np.ndarray]:
    """The same scan stored with its first two axes reversed (same world positions)."""
    flip = np.eye(4)
    for axis in (0, 1):
        flip[axis, axis], flip[axis, 3] = -1.0, volume.shape[axis] - 1
    return volume.suv[::-1, ::-1].copy(), volume.affine @ flip


def canonical(volume) -> np.ndarray:
    """The scan's SUV in RAS+ axis order, by nibabel."""
    return np.asarray(nib.as_closest_canonical(nib.Nifti1Image(volume.suv, volume.affine)).dataobj)


def build_sources(root: Path) -> Path:
    """A config with one source per layout, each with good cases and the problem cases the checks must catch;
    returns the config's path. Expected outcomes are in EXPECTED."""
    (a, a_lesions, _), (b, b_lesions, _), (c, c_lesions, _), (d, d_lesions, _) = scans()

    autopet = root / "autopet"
    study = autopet / "PETCT_0001" / "08-12-2005-NA-PET-CT Ganzkoerper"
    study.mkdir(parents=True)
    suv, affine = lps(a)
    save_nifti(suv, affine, study / "SUV.nii.gz")
    save_nifti((a_lesions[::-1, ::-1] > 0).astype(np.uint8), affine, study / "SEG.nii.gz")
    save_nifti(np.full(suv.shape, -1000.0, np.float32), affine, study / "CTres.nii.gz")
    raw = autopet / "PETCT_0002" / "study"  # Bq/mL only, converted with the metadata CSV
    raw.mkdir(parents=True)
    weight_kg, dose_bq, delay_s = 80.0, 3.0e8, 3600.0
    becquerel_per_suv = dose_bq * 2.0 ** (-delay_s / 6586.2) / (weight_kg * 1000.0)
    save_nifti((b.suv * becquerel_per_suv).astype(np.float32), b.affine, raw / "PET.nii.gz")
    save_nifti((b_lesions > 0).astype(np.uint8), b.affine, raw / "SEG.nii.gz")
    no_row = autopet / "PETCT_0003" / "study"  # Bq/mL without a metadata row
    no_row.mkdir(parents=True)
    save_nifti((c.suv * becquerel_per_suv).astype(np.float32), c.affine, no_row / "PET.nii.gz")
    as_suv = autopet / "PETCT_0004" / "study"  # Bq/mL saved under the SUV name
    as_suv.mkdir(parents=True)
    save_nifti((d.suv * becquerel_per_suv).astype(np.float32), d.affine, as_suv / "SUV.nii.gz")
    with open(autopet / "metadata.csv", "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["study", "weight_kg", "dose_bq", "injection_to_scan_s"])
        writer.writerow(["PETCT_0002/study", weight_kg, dose_bq, delay_s])

    nnunet = root / "nnunet"
    for folder in ("imagesTr", "labelsTr", "imagesTs"):
        (nnunet / folder).mkdir(parents=True)
    (nnunet / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT", "1": "PET"}, "labels": {"background": 0, "tumor": 1, "liver": 2},
        "numTraining": 4, "file_ending": ".nii.gz"}))

    def nnunet_case(name, volume, label, folder="imagesTr", scale=1.0):
        save_nifti(np.full(volume.shape, -1000.0, np.float32), volume.affine, nnunet / folder / f"{name}_0000.nii.gz")
        save_nifti(volume.suv * scale, volume.affine, nnunet / folder / f"{name}_0001.nii.gz")
        if label is not None:
            save_nifti(label.astype(np.uint8), volume.affine, nnunet / "labelsTr" / f"{name}.nii.gz")

    with_liver = (c_lesions > 0).astype(np.uint8)
    with_liver[:4, :4, :4] = 2
    nnunet_case("psma_0001", c, with_liver)
    nnunet_case("fdg_0002", a, a_lesions > 0)  # the autoPET study again: a duplicate
    nnunet_case("fdg_0003", d, np.zeros(d.shape))  # empty label: a negative scan
    nnunet_case("psma_0004", b, np.ones(b.shape))  # all foreground
    nnunet_case("psma_0005", d, None, folder="imagesTs", scale=0.9)  # unlabeled

    dicom = root / "dicom"
    write_pet_series(d.suv, d.affine, dicom / "patient01" / "PET_WB", seed=1, patient_id="P1")
    write_pet_series(b.suv, b.affine, dicom / "patient02" / "PET", decay_correction="NONE", seed=2, patient_id="P2")
    # The same series (same UIDs) exported again, rescaled: a duplicate by its series UID, not its content.
    write_pet_series(d.suv * 1.05, d.affine, dicom / "patient01_copy" / "PET_WB", seed=1, patient_id="P1")
    (dicom / "labels").mkdir()
    save_nifti((d_lesions > 0).astype(np.uint8), d.affine, dicom / "labels" / "patient01__PET_WB.nii.gz")
    # A series labelled by a DICOM-SEG in its own folder (written by MONAI Label's converter, as the server's
    # DICOMweb datastore writes them).
    write_pet_series(c.suv * 0.8, c.affine, dicom / "patient03" / "PET", seed=3, patient_id="P3")
    save_nifti((c_lesions > 0).astype(np.uint8), c.affine, root / "patient03_label.nii.gz")
    seg_file = nifti_to_dicom_seg(str(dicom / "patient03" / "PET"), str(root / "patient03_label.nii.gz"), None,
                                  use_itk=False)
    (dicom / "patient03" / "SEG").mkdir()
    shutil.move(seg_file, dicom / "patient03" / "SEG" / "seg.dcm")
    # A SEG drawn on patient01's grid but referencing patient04's series, whose voxels sit half a voxel away:
    # refused, not misplaced.
    shifted = a.affine.copy()
    shifted[:3, 3] += 2.0
    slices = write_pet_series(a.suv * 0.7, shifted, dicom / "patient04" / "PET", seed=4, patient_id="P4")
    wrong = pydicom.dcmread(nifti_to_dicom_seg(str(dicom / "patient01" / "PET_WB"),
                                               str(dicom / "labels" / "patient01__PET_WB.nii.gz"), None, use_itk=False))
    wrong.ReferencedSeriesSequence[0].SeriesInstanceUID = pydicom.dcmread(slices[0]).SeriesInstanceUID
    (dicom / "patient04" / "SEG").mkdir()
    wrong.save_as(dicom / "patient04" / "SEG" / "seg.dcm")

    plain = root / "plain"
    (plain / "pet").mkdir(parents=True)
    (plain / "seg").mkdir()
    save_nifti(c.suv * 1.1, c.affine, plain / "pet" / "x01_suv.nii.gz")
    save_nifti((c_lesions > 0).astype(np.uint8), c.affine, plain / "seg" / "x01_seg.nii.gz")
    save_nifti(b.suv * 1.1, b.affine, plain / "pet" / "x02_suv.nii.gz")  # label on another grid
    save_nifti((b_lesions[:-2] > 0).astype(np.uint8), b.affine, plain / "seg" / "x02_seg.nii.gz")
    save_nifti(a.suv * 1.1, a.affine, plain / "pet" / "x03_suv.nii.gz")  # a label value nobody mapped
    save_nifti(np.where(a_lesions > 0, 7, 0).astype(np.uint8), a.affine, plain / "seg" / "x03_seg.nii.gz")
    (plain / "pet" / "x04_suv.nii.gz").write_bytes(b"not a NIfTI file at all")
    save_nifti(np.full(d.shape, -1000.0, np.float32), d.affine, plain / "pet" / "x05_suv.nii.gz")  # a CT

    config = {"sources": [
        {"name": "autopet", "layout": "autopet", "path": "autopet", "tracer": "fdg", "tier": "high",
         "metadata": "autopet/metadata.csv", "note": "synthetic autoPET-style studies"},
        {"name": "merged", "layout": "nnunet", "path": "nnunet", "tracer": "from_case_name", "tier": "low",
         "targets": {"tumor": "lesion", "liver": "liver"}},
        {"name": "site", "layout": "dicom", "path": "dicom", "labels": "labels", "tracer": "fdg", "tier": "high"},
        {"name": "plain", "layout": "nifti", "path": "plain", "tracer": "psma", "tier": "low",
         "images": "pet/{case}_suv.nii.gz", "labels": "seg/{case}_seg.nii.gz"},
    ]}
    path = root / "cohort.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


IMPORTED = {"autopet__PETCT_0001_08-12-2005-NA-PET-CT_Ganzkoerper": "labeled", "autopet__PETCT_0002_study": "labeled",
            "merged__psma_0001": "labeled", "merged__fdg_0003": "negative", "merged__psma_0005": "unlabeled",
            "site__patient01__PET_WB": "labeled", "site__patient03__PET": "labeled", "plain__x01": "labeled"}
REFUSED = {"autopet__PETCT_0003_study": "metadata CSV has no row", "autopet__PETCT_0004_study": "Bq/mL",
           "merged__fdg_0002": "duplicate of autopet__PETCT_0001", "merged__psma_0004": "foreground",
           "site__patient02__PET": "DecayCorrection", "site__patient01_copy__PET_WB": "duplicate of site__patient01",
           "site__patient04__PET": "DICOM-SEG seg.dcm: grid mismatch", "plain__x02": "grid mismatch",
           "plain__x03": "values [7] are not in the source's targets", "plain__x04": "cannot be read as NIfTI",
           "plain__x05": "look like a CT"}


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    return build_sources(tmp_path_factory.mktemp("sources"))


@pytest.fixture(scope="module")
def curated(config, tmp_path_factory):
    """The sources curated once over two worker processes: (datastore, the run)."""
    folder = tmp_path_factory.mktemp("curated")
    datastore = PETDatastore(str(folder), extensions=("*.nii.gz", "*.nii"), auto_reload=False)
    run = curate(load_config(config), datastore, workers=2)
    return datastore, run


def test_every_layout_imports_standardised_tiered_cases_with_provenance(curated, config):
    datastore, run = curated
    assert sorted(run.imported) == sorted(IMPORTED)
    tiers = {"autopet": "high", "merged": "low", "site": "high", "plain": "low"}
    for image_id, status in IMPORTED.items():
        image = nib.load(datastore.get_image_uri(image_id))
        assert image.get_data_dtype() == np.float32 and nib.aff2axcodes(image.affine) == ("R", "A", "S")
        info = datastore.get_image_info(image_id)
        provenance = info["curation"]
        assert provenance["label_status"] == status and Path(provenance["image_path"]).exists()
        assert provenance["source"] == image_id.split("__")[0] and info["tracer"] in ("fdg", "psma")
        label_id = datastore.get_label_by_image_id(image_id, "final")
        assert bool(label_id) == (status != "unlabeled")
        if label_id:
            label = nib.load(datastore.get_label_uri(label_id, "final"))
            assert label.shape == image.shape and np.allclose(label.affine, image.affine)
            assert set(np.unique(np.asarray(label.dataobj))) <= {0, *TARGETS.values()}
            assert datastore.get_label_info(label_id, "final")["quality"] == tiers[provenance["source"]]
    assert datastore.get_image_info("merged__psma_0001")["tracer"] == "psma"

    # Reoriented, not resampled: the hottest voxel keeps its world position and value.
    autopet_id = "autopet__PETCT_0001_08-12-2005-NA-PET-CT_Ganzkoerper"
    source = nib.load(datastore.get_image_info(autopet_id)["curation"]["image_path"])
    assert nib.aff2axcodes(source.affine) != ("R", "A", "S")
    imported = nib.load(datastore.get_image_uri(autopet_id))
    hottest = [np.unravel_index(np.argmax(np.asarray(x.dataobj)), x.shape) for x in (source, imported)]
    world = [x.affine @ [*voxel, 1] for x, voxel in zip((source, imported), hottest, strict=True)]
    assert np.allclose(world[0], world[1])

    # Bq/mL with its metadata row and DICOM with the QIBA rules both become the SUV they were written from.
    b, _, _ = scans()[1]
    converted = np.asarray(nib.load(datastore.get_image_uri("autopet__PETCT_0002_study")).dataobj)
    assert np.allclose(converted, canonical(b), rtol=1e-4, atol=1e-4)
    d, _, _ = scans()[3]
    from_dicom = np.asarray(nib.load(datastore.get_image_uri("site__patient01__PET_WB")).dataobj)
    assert np.abs(from_dicom - canonical(d)).max() < 1e-3 * d.suv.max()
    assert datastore.get_image_info("site__patient01__PET_WB")["curation"]["conversion"]["suv_factor"] > 0

    # The DICOM-SEG, placed on its series' grid: the lesions it was written from.
    c, c_lesions, _ = scans()[2]
    label_id = datastore.get_label_by_image_id("site__patient03__PET", "final")
    from_seg = np.asarray(nib.load(datastore.get_label_uri(label_id, "final")).dataobj)
    truth = nib.as_closest_canonical(nib.Nifti1Image((c_lesions > 0).astype(np.uint8), c.affine))
    assert from_seg.any() and np.array_equal(from_seg, np.asarray(truth.dataobj) * LESION)

    # The organ target of the nnU-Net source kept its name through the vocabulary.
    label_id = datastore.get_label_by_image_id("merged__psma_0001", "final")
    values = set(np.unique(np.asarray(nib.load(datastore.get_label_uri(label_id, "final")).dataobj)))
    assert values == {0, LESION, TARGETS["liver"]}

    # What training and the active-learning strategies read: every labeled scan with its tier.
    records = {record["id"]: record["tier"] for record in records_from_datastore(datastore)}
    assert records == {image_id: tiers[image_id.split("__")[0]] for image_id, status in IMPORTED.items()
                       if status != "unlabeled"}


def test_problem_cases_are_refused_with_the_reason_and_leave_nothing_behind(curated):
    datastore, run = curated
    errors = {p["id"]: p["reason"] for p in run.problems if p["severity"] == "error"}
    assert sorted(errors) == sorted(REFUSED)
    for image_id, words in REFUSED.items():
        assert words in errors[image_id], errors[image_id]
    warnings = {p["id"] for p in run.problems if p["severity"] == "warning"}
    assert "merged__fdg_0003" in warnings  # the empty label: imported, flagged
    folder = Path(datastore.folder)
    leftovers = [p.name for p in folder.rglob("*.nii*") if any(i in p.name for i in REFUSED)]
    assert leftovers == [] and set(datastore.list_images()) == set(IMPORTED)
    assert not (folder / STATE / STAGING_DIR).exists() and not (folder / STATE / JOURNAL).exists()


def test_a_second_run_reads_nothing_unchanged_and_reimports_a_changed_case(curated, config):
    datastore, _ = curated
    again = curate(load_config(config), datastore, workers=1)
    assert again.imported == [] and again.unchanged == len(IMPORTED)
    assert {p["id"] for p in again.problems if p["severity"] == "error"} == set(REFUSED)  # refused ones retried

    changed = config.parent / "plain" / "pet" / "x01_suv.nii.gz"
    volume = nib.load(changed)
    save_nifti(np.asarray(volume.dataobj) * 1.5, volume.affine, changed)
    third = curate(load_config(config), datastore, workers=1)
    assert third.imported == ["plain__x01"]
    assert np.allclose(np.asarray(nib.load(datastore.get_image_uri("plain__x01")).dataobj),
                       np.asarray(nib.as_closest_canonical(nib.load(changed)).dataobj))


def test_a_run_killed_while_moving_files_in_is_undone_and_redone(config, tmp_path):
    datastore = PETDatastore(str(tmp_path), extensions=("*.nii.gz", "*.nii"), auto_reload=False)
    sources = [source for source in load_config(config) if source.name == "plain"]
    first = curate(sources, datastore, workers=1)
    assert first.imported == ["plain__x01"]
    # What a kill between moving the files and recording them leaves: the batch in the journal, the record
    # gone, files in place (and a staged file of a case still being read).
    state = tmp_path / STATE
    (state / JOURNAL).write_text(json.dumps(["plain__x01"]))
    record = datastore._datastore.objects.pop("plain__x01")
    datastore._update_datastore_file()
    (state / STAGING_DIR / "plain__x02").mkdir(parents=True)
    (state / STAGING_DIR / "plain__x02" / "image.nii.gz").write_bytes(b"half written")
    assert record is not None and (tmp_path / "plain__x01.nii.gz").exists()

    reopened = PETDatastore(str(tmp_path), extensions=("*.nii.gz", "*.nii"), auto_reload=False)
    resumed = curate(sources, reopened, workers=1)
    assert resumed.recovered == ["plain__x01"] and resumed.imported == ["plain__x01"]
    assert reopened.get_image_info("plain__x01")["curation"]["label_status"] == "labeled"
    assert reopened.get_label_by_image_id("plain__x01", "final")
    assert not (state / JOURNAL).exists() and not (state / STAGING_DIR).exists()
    assert sorted(reopened.list_images()) == ["plain__x01"]


def test_the_qc_report_counts_sources_tiers_targets_and_problems(curated, tmp_path):
    datastore, run = curated
    paths = write_report(datastore, tmp_path, run=run.to_dict(), gallery=3)
    summary = json.loads(paths["json"].read_text())
    assert summary["cases"] == len(IMPORTED)
    merged = summary["sources"]["merged"]
    assert merged["cases"] == 3 and merged["tiers"] == {"low": 2, "unlabeled": 1}
    assert merged["labels"] == {"labeled": 1, "negative": 1, "unlabeled": 1}
    assert merged["tracers"] == {"psma": 2, "fdg": 1} and merged["cases_with_organ"] == {"liver": 1}
    autopet = summary["sources"]["autopet"]
    assert autopet["lesions"] >= 2 and autopet["lesion_volume_ml"]["max"] > 0
    assert sum(row["cases"] for row in summary["by_source_tracer_tier"]) == len(IMPORTED)
    assert sum(summary["sources"]["site"]["suv_histogram"]) > 0
    assert summary["problems"]["errors"] == len(REFUSED)
    page = paths["html"].read_text()
    for words in ("Cohort QC", "x02", "grid mismatch", "suv_histograms.png",
                  "lesion_volumes.png", "grids.png"):
        assert words in page
    gallery = sorted((tmp_path / "img").glob("mip_*.png"))
    assert len(gallery) == 3 and {p.stem.split("__")[0][4:] for p in gallery} == {"autopet", "merged", "plain"}
    assert all(p.stat().st_size > 5000 for p in tmp_path.glob("img/*.png"))
    assert len(list((Path(datastore.folder) / STATE / QC_DIR).glob("*.json"))) == len(IMPORTED)


@pytest.mark.parametrize("change, words", [
    ({"layout": "bids"}, "layout 'bids' is not one of"),
    ({"tier": "medium"}, "tier 'medium' is not one of"),
    ({"path": "missing"}, "is not a folder"),
    ({"targets": {1: "tumour"}}, "target 'tumour' (for label 1) is not in the vocabulary"),
    ({"colour": "red"}, "unknown field(s) colour"),
    ({"images": "pet/*.nii.gz"}, "needs 'images' and 'labels' patterns with {case}"),
])
def test_config_mistakes_name_the_source_and_the_fix(config, tmp_path, change, words):
    record = yaml.safe_load(config.read_text())
    record["sources"][3].update(change)
    bad = config.parent / "bad.yaml"
    bad.write_text(yaml.safe_dump(record))
    with pytest.raises(UserInputError, match="source 4 \\(plain\\)") as caught:
        load_config(bad)
    assert words in str(caught.value)


def test_nnunet_labels_without_a_target_are_a_config_error(config, tmp_path):
    record = yaml.safe_load(config.read_text())
    record["sources"] = [record["sources"][1]]
    del record["sources"][0]["targets"]
    bad = config.parent / "no_targets.yaml"
    bad.write_text(yaml.safe_dump(record))
    datastore = PETDatastore(str(tmp_path), extensions=("*.nii.gz",), auto_reload=False)
    with pytest.raises(UserInputError, match="label 'tumor' \\(1\\) has no target"):
        curate(load_config(bad), datastore)
    assert datastore.list_images() == []


def test_the_command_line_curates_and_reports(config, tmp_path):
    record = yaml.safe_load(config.read_text())
    record["sources"] = [record["sources"][3]]
    for source in record["sources"]:
        source["path"] = str(config.parent / source["path"])
    single = tmp_path / "plain.json"
    single.write_text(json.dumps(record))
    studies = tmp_path / "studies"
    command = [sys.executable, "-m", "segany_pet.cli", "curate", str(single), str(studies), "--workers", "1",
               "--gallery", "1"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "lib")})
    assert done.returncode == 0, done.stderr
    assert "1 imported" in done.stdout and "4 refused" in done.stdout
    assert "plain/x02: label x02_seg.nii.gz: grid mismatch" in done.stderr
    assert (studies / ".segany_pet" / "curate" / "report" / "index.html").exists()

    shutil.rmtree(config.parent / "missing", ignore_errors=True)
    record["sources"][0]["path"] = str(config.parent / "missing")
    single.write_text(json.dumps(record))
    failed = subprocess.run(command, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "lib")})
    assert failed.returncode == 2 and "is not a folder" in failed.stderr and "Traceback" not in failed.stderr


@pytest.mark.server
@pytest.mark.slow
def test_the_server_serves_a_curated_datastore_as_it_is(curated, random_checkpoint, tmp_path):
    """Images, labels with their tiers, and a click, straight from what curate wrote."""
    datastore, _ = curated
    with running_server(Path(datastore.folder), [("model", random_checkpoint)], tmp_path) as url:
        objects = MONAILabelClient(url).datastore()["objects"]
        assert set(objects) == set(IMPORTED)
        tiers = {image_id: record["labels"].get("final", {}).get("info", {}).get("quality")
                 for image_id, record in objects.items()}
        assert tiers["merged__psma_0001"] == "low" and tiers["site__patient01__PET_WB"] == "high"
        assert tiers["merged__psma_0005"] is None
        params = {"foreground": [[18, 18, 22]], "client_id": "curator"}
        click = requests.post(f"{url}/infer/segany_pet", params={"image": "plain__x01", "output": "json"},
                              data={"params": json.dumps(params)}, timeout=120)
        assert click.status_code == 200, click.text
        assert click.json()["model"] == random_checkpoint.name
