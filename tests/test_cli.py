"""The segany-pet command line: cohort and noisy-label stages."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np

from segany_pet.cli import main
from support import TINY


def test_phantom_then_noise_writes_a_cohort_and_its_noisy_labels(tmp_path, capsys):
    assert main(["phantom", "--out", str(tmp_path), "--cases", "2", "--tracer", "fdg", "--seed", "5"]) == 0
    images = sorted(path.name for path in (tmp_path / "images").iterdir())
    assert images == ["fdg_0000.nii.gz", "fdg_0001.nii.gz"]
    for case in ("fdg_0000", "fdg_0001"):
        assert json.loads((tmp_path / "truth" / f"{case}.json").read_text())["tracer"] == "fdg"

    assert main(["noise", "--cohort", str(tmp_path), "--rate", "1.0", "--seed", "2"]) == 0
    assert "2 corrupted" in capsys.readouterr().out
    records = json.loads((tmp_path / "noisy_labels" / "noise_records.json").read_text())["cases"]
    for case, record in records.items():
        assert record["corrupted"]
        noisy = np.asanyarray(nib.load(tmp_path / "noisy_labels" / f"{case}.nii.gz").dataobj)
        truth = np.asanyarray(nib.load(tmp_path / "truth" / f"{case}_lesions.nii.gz").dataobj) > 0
        assert noisy.shape == truth.shape and not np.array_equal(noisy > 0, truth)


def test_train_then_evaluate_from_the_command_line(tmp_path, capsys):
    """`segany-pet train` on a 2-case phantom cohort with the tiny preset, then `segany-pet evaluate` of the
    model it wrote on two more (cases without a lesion are skipped): the report files exist and hold a Dice per
    click for every lesion."""
    cohort, test = tmp_path / "cohort", tmp_path / "test"
    assert main(["phantom", "--out", str(cohort), "--cases", "2", "--seed", "3"]) == 0
    assert main(["phantom", "--out", str(test), "--cases", "2", "--seed", "4"]) == 0
    labels = tmp_path / "labels"
    labels.mkdir()
    for path in (cohort / "truth").glob("*_lesions.nii.gz"):
        image = nib.load(path)
        mask = (np.asanyarray(image.dataobj) > 0).astype(np.uint8)
        nib.save(nib.Nifti1Image(mask, image.affine), labels / path.name.replace("_lesions", ""))
    config = tmp_path / "train.json"
    config.write_text(json.dumps({"preset": TINY.to_dict(), "progress_bar": False}))
    out = tmp_path / "run"
    assert main(["train", "--images", str(cohort / "images"), "--labels", str(labels), "--out", str(out),
                 "--config", str(config), "--epochs", "1", "--iterations", "2", "--batch-size", "1"]) == 0
    assert json.loads((out / "train_stats.json").read_text())["status"] == "finished"

    report = tmp_path / "report"
    assert main(["evaluate", "--model", str(out / "model_best.pt"), "--cohort", str(test), "--out", str(report),
                 "--clicks", "2", "--no-autopet"]) == 0
    summary = json.loads((report / "interactive_eval.json").read_text())["summary"]
    lesions = sum(np.unique(np.asanyarray(nib.load(path).dataobj)).size - 1
                  for path in (test / "truth").glob("*_lesions.nii.gz"))
    assert summary["lesions"] == lesions > 0
    assert len(summary["model"]["all"]["dice_curve"]) == 2
    assert set(summary["baselines"]) >= {"relative_41", "fixed_2.5"}
    assert (report / "interactive_eval.md").read_text().startswith("## ")
    assert "model, 1 click" in capsys.readouterr().out


def test_evaluate_and_train_explain_bad_input(tmp_path, capsys):
    assert main(["evaluate", "--model", str(tmp_path / "missing.pt"), "--cohort", str(tmp_path),
                 "--out", str(tmp_path / "r")]) == 2
    assert "missing.pt" in capsys.readouterr().err
    assert main(["train", "--images", str(tmp_path / "none"), "--labels", str(tmp_path), "--out",
                 str(tmp_path / "run")]) == 2
    assert "is not a folder" in capsys.readouterr().err
