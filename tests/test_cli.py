"""The segany-pet command line: cohort and noisy-label stages."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np

from segany_pet.cli import main


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
