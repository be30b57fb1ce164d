"""PET DICOM series to SUV: QIBA test vectors, real vendor headers, the synthetic series round trip, refusals."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from datetime import datetime, timedelta

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from segany_pet.errors import InvalidImageError, UserInputError
from segany_pet.pet import read_pet_series, suv_conversion
from segany_pet.phantom.dicom import write_pet_series
from support import REPO

ACTIVITY = 10000.0  # Bq/mL: the pixel value of the QIBA test vectors


def pet_header(*, weight=75.0, dose=3.7e8, half_life=6586.2, injection="20240305090000", injection_time=None,
               series_date="20240305", series_time="100000", acquisition_time=None, units="BQML",
               decay_correction="START", height=None, sex=None) -> Dataset:
    """The tags the SUV conversion reads, as one PET slice carries them (QIBA vector defaults)."""
    header = Dataset()
    header.Modality = "PT"
    header.Units = units
    header.DecayCorrection = decay_correction
    header.CorrectedImage = ["ATTN", "DECY", "SCAT"]
    header.PatientWeight = weight
    if height is not None:
        header.PatientSize = height
    if sex is not None:
        header.PatientSex = sex
    header.SeriesDate, header.SeriesTime = series_date, series_time
    header.AcquisitionDate, header.AcquisitionTime = series_date, acquisition_time or series_time
    radiopharmaceutical = Dataset()
    radiopharmaceutical.RadionuclideTotalDose = dose
    radiopharmaceutical.RadionuclideHalfLife = half_life
    if injection is not None:
        radiopharmaceutical.RadiopharmaceuticalStartDateTime = injection
    if injection_time is not None:
        radiopharmaceutical.RadiopharmaceuticalStartTime = injection_time
    header.RadiopharmaceuticalInformationSequence = [radiopharmaceutical]
    return header


def with_private(header: Dataset, group: int, creator: str, offset: int, vr: str, value) -> Dataset:
    header.private_block(group, creator, create=True).add_new(offset, vr, value)
    return header


# --- QIBA test vectors and real vendor headers --------------------------------------------------------------


@pytest.mark.parametrize(
    ("tags", "expected"),
    [
        ({}, 2.96075),  # START, 3600 s after injection
        ({"injection": None, "injection_time": "233000", "series_date": "20240306", "series_time": "003000"}, 2.96075),
        ({"decay_correction": "ADMIN"}, 2.02703),
        ({"acquisition_time": "100500"}, 2.96075),  # 3.05572 if the acquisition time were taken
    ],
    ids=["start", "time-only-across-midnight", "admin", "acquisition-after-series"],
)
def test_qiba_suvbw_vectors(tags, expected):
    conversion = suv_conversion(pet_header(**tags))
    assert conversion.factor("bw") * ACTIVITY == pytest.approx(expected, rel=1e-5)
    assert conversion.warnings == []


@pytest.mark.parametrize(
    ("norm", "sex", "expected", "body", "body_value"),
    [
        ("lbm", "M", 2.40473, "lean_body_mass_kg", 60.915),
        ("lbm", "F", 1.94282, "lean_body_mass_kg", 49.214),
        ("bsa", "M", 0.78218, "body_surface_area_m2", 1.98138),
    ],
)
def test_qiba_sul_and_suvbsa_vectors(norm, sex, expected, body, body_value):
    conversion = suv_conversion(pet_header(height=1.85, sex=sex))
    assert conversion.factor(norm) * ACTIVITY == pytest.approx(expected, rel=1e-5)
    assert getattr(conversion, body) == pytest.approx(body_value, rel=1e-5)


def ge_header(series_time="095621", acquisition_time=None) -> Dataset:
    return pet_header(weight=52, dose=152022720, half_life=6586.2001953125, injection=None, injection_time="084500",
                      series_time=series_time, acquisition_time=acquisition_time)


def siemens_header(**tags) -> Dataset:
    return pet_header(weight=67, dose=3.74e8, injection="20240305083045", **tags)


@pytest.mark.parametrize(
    ("header", "expected", "source"),
    [
        (ge_header(), 5.367387681819742e-4, "SeriesDate/SeriesTime"),
        # GE series saved again after the scan: only the private scan datetime gives the right answer
        (with_private(ge_header(series_time="103000", acquisition_time="095800"), 0x0009, "GEMS_PETD_01", 0x0D,
                      "DT", "20240305095621"), 5.367387681819742e-4, "GE private"),
        (siemens_header(series_time="104829", acquisition_time="104830.35"), 4.2748316187197236e-4, "Series"),
        (pet_header(weight=65, dose=2.25e8, injection="20240305114100", series_time="123515.000000",
                    acquisition_time="123514.999995"), 4.0691568540e-4, "earliest Acquisition"),
    ],
    ids=["ge", "ge-private-scan-time", "siemens", "siemens-series-a-hair-after-acquisition"],
)
def test_real_vendor_header_factors(header, expected, source):
    conversion = suv_conversion(header)
    assert conversion.factor("bw") == pytest.approx(expected, rel=1e-6)
    assert source in conversion.scan_time_source
    assert bool(conversion.warnings) == source.startswith("earliest")


def test_philips_counts_use_the_private_suv_factor_else_the_activity_scale():
    header = pet_header(units="CNTS")
    with_private(header, 0x7053, "Philips PET Private Group", 0x00, "DS", "0.000728")
    assert suv_conversion(header).factor("bw") == pytest.approx(0.000728, rel=1e-6)

    header = with_private(pet_header(units="CNTS"), 0x7053, "Philips PET Private Group", 0x09, "DS", "2.5")
    conversion = suv_conversion(header)
    assert conversion.factor("bw") * ACTIVITY / 2.5 == pytest.approx(2.96075, rel=1e-5)
    assert conversion.activity_scale == 2.5


def test_gml_is_suv_already_and_height_in_cm_is_converted_with_a_warning():
    conversion = suv_conversion(pet_header(units="GML", height=185, sex="M"))
    assert conversion.factor("bw") == 1.0
    assert conversion.height_m == pytest.approx(1.85)
    assert conversion.factor("lbm") == pytest.approx(60.915 / 75, rel=1e-5)
    assert any("PatientSize" in warning and "centimetres" in warning for warning in conversion.warnings)


def without_dose(header: Dataset) -> Dataset:
    del header.RadiopharmaceuticalInformationSequence[0].RadionuclideTotalDose
    return header


def cnts_without_philips_tags() -> Dataset:
    return pet_header(units="CNTS")


@pytest.mark.parametrize(
    ("header", "words"),
    [
        (pet_header(decay_correction="NONE"), r"DecayCorrection \(0054,1102\) is NONE"),
        (pet_header(dose=370), r"RadionuclideTotalDose \(0018,1074\) = 370 Bq .* looks like MBq"),
        (without_dose(pet_header()), r"RadionuclideTotalDose \(0018,1074\) is missing"),
        (cnts_without_philips_tags(), r"CNTS .*\(7053,1000\)"),
        (pet_header(weight=0), r"PatientWeight \(0010,1030\) is missing"),
        (pet_header(weight=750), r"PatientWeight \(0010,1030\) = 750 kg"),
        (pet_header(series_time="160000"), r"7.00 h, outside 0..6 h"),
        (pet_header(injection="20240305103000"), r"RadiopharmaceuticalStartDateTime \(0018,1078\)"),
        (pet_header(height=0.1), r"PatientSize \(0010,1020\) = 0.1 m"),
    ],
    ids=["decay-none", "dose-in-mbq", "no-dose", "cnts-without-philips", "no-weight", "weight-750", "decay-7h",
         "injected-after-scan", "height-0.1m"],
)
def test_headers_that_would_give_wrong_suvs_are_refused_naming_the_tag(header, words):
    with pytest.raises(InvalidImageError, match=words):
        suv_conversion(header)


def test_attenuation_uncorrected_series_is_refused():
    header = pet_header()
    header.CorrectedImage = ["DECY", "NORM"]
    with pytest.raises(InvalidImageError, match=r"CorrectedImage \(0028,0051\).* lacks ATTN .*NAC"):
        suv_conversion(header)


@pytest.mark.parametrize(("tags", "norm", "words"), [({"height": 1.85}, "lbm", "PatientSex"),
                                                     ({"sex": "F"}, "bsa", "PatientSize")])
def test_normalisations_missing_their_inputs_are_refused(tags, norm, words):
    conversion = suv_conversion(pet_header(**tags))
    with pytest.raises(InvalidImageError, match=words):
        conversion.factor(norm)
    with pytest.raises(UserInputError, match="unknown SUV normalisation"):
        conversion.factor("ideal")


# --- the synthetic series: round trip ----------------------------------------------------------------------------


def oblique_affine() -> np.ndarray:
    """Rotated about two axes, anisotropic 2.0 x 2.5 x 3.0 mm voxels, away from the origin."""
    a, b = np.radians(20.0), np.radians(-35.0)
    about_x = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    about_z = np.array([[np.cos(b), -np.sin(b), 0], [np.sin(b), np.cos(b), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = about_z @ about_x @ np.diag([2.0, 2.5, 3.0])
    affine[:3, 3] = [-120.5, 48.25, 310.0]
    return affine


def synthetic_suv(shape=(24, 20, 16)) -> np.ndarray:
    """Warm body with a hot spot and a slice-to-slice gradient, so per-slice slopes really differ."""
    i, j, k = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    suv = 0.5 + 0.1 * k + np.random.default_rng(3).gamma(4.0, 0.25, shape)
    suv += 12.0 * np.exp(-((i - 15) ** 2 + (j - 6) ** 2 + (k - 4) ** 2) / 6.0)
    return suv.astype(np.float32)


@pytest.mark.parametrize(
    ("options", "source"),
    [
        # GE: series re-saved after the scan; three bed positions acquired from the last slice back
        ({"vendor": "ge", "series_time": datetime(2024, 3, 5, 10, 40), "slices_per_bed": 6}, "GE private"),
        ({"vendor": "philips", "units": "CNTS"}, None),
        ({"decay_correction": "ADMIN", "per_slice_slope": False}, None),
    ],
    ids=["ge-bqml", "philips-cnts", "admin-one-slope"],
)
def test_written_series_reads_back_as_the_same_suv_on_the_same_grid(tmp_path, options, source):
    suv, affine = synthetic_suv(), oblique_affine()
    paths = write_pet_series(suv, affine, tmp_path, **options)
    assert [path.name for path in paths] != sorted(path.name for path in paths)  # file names not in slice order
    slopes = {float(pydicom.dcmread(path, stop_before_pixels=True).RescaleSlope) for path in paths}
    assert len(slopes) == (1 if options.get("per_slice_slope") is False else len(paths))

    volume = read_pet_series(tmp_path)
    np.testing.assert_allclose(volume.affine, affine, atol=1e-4)
    assert volume.suv.dtype == np.float32 and volume.shape == suv.shape
    np.testing.assert_allclose(volume.suv, suv, rtol=5e-3, atol=1e-3)
    conversion = volume.meta["suv_conversion"]
    assert volume.meta["suv_norm"] == "bw" and volume.meta["suv_factor"] == conversion["factors"]["bw"]
    assert conversion["weight_kg"] == 75.0 and volume.meta["series"]["slices"] == 16
    if options.get("units") == "CNTS":  # the Philips SUV factor replaces dose and times
        assert conversion["philips_suv_factor"] == pytest.approx(volume.meta["suv_factor"])
    else:
        assert conversion["dose_bq"] == 3.7e8 and conversion["decay_correction"] == options.get("decay_correction",
                                                                                                   "START")
    if source:
        assert source in conversion["scan_time_source"] and conversion["decay_time_s"] == 3600.0
        assert conversion["injection_time"] == "2024-03-05T09:00:00"


def test_sul_and_suvbsa_scale_the_suvbw_image(tmp_path):
    suv = synthetic_suv((6, 5, 4))
    write_pet_series(suv, np.diag([-4.0, -4.0, 4.0, 1.0]), tmp_path, height_m=1.85, sex="F")
    bw = read_pet_series(tmp_path).suv
    np.testing.assert_allclose(read_pet_series(tmp_path, norm="lbm").suv, bw * 49.214 / 75, rtol=1e-4)
    np.testing.assert_allclose(read_pet_series(tmp_path, norm="bsa").suv, bw * 19813.8 / 75000, rtol=1e-4)


# --- the series reader: refusals ---------------------------------------------------------------------------------


def small_series(folder, **options):
    return write_pet_series(synthetic_suv((6, 5, 6)), np.diag([-4.0, -4.0, 3.0, 1.0]), folder, **options)


def rewrite(path, **tags):
    dataset = pydicom.dcmread(path)
    for keyword, value in tags.items():
        setattr(dataset, keyword, value)
    dataset.save_as(path)


def test_mixed_units_are_refused(tmp_path):
    paths = small_series(tmp_path)
    rewrite(paths[2], Units="CNTS")
    with pytest.raises(InvalidImageError, match=r"Units \(0054,1001\) differs .*BQML \(5 files\), CNTS \(1 files\)"):
        read_pet_series(tmp_path)


def test_a_missing_slice_is_refused_with_its_position(tmp_path):
    small_series(tmp_path, skip_slices=[3])
    with pytest.raises(InvalidImageError, match=r"missing slices: .* from 6.00 to 12.00 mm .*spacing elsewhere 3 mm"):
        read_pet_series(tmp_path)


def test_duplicated_uneven_or_sheared_slices_are_refused(tmp_path):
    paths = small_series(tmp_path / "duplicate")
    copy = tmp_path / "duplicate" / "copy.dcm"
    shutil.copy(paths[2], copy)
    rewrite(copy, SOPInstanceUID=generate_uid())
    with pytest.raises(InvalidImageError, match=r"repeat a position .*6.00 mm"):
        read_pet_series(tmp_path / "duplicate")

    paths = small_series(tmp_path / "uneven")
    rewrite(paths[2], ImagePositionPatient=[0.0, 0.0, 6.5])
    with pytest.raises(InvalidImageError, match="slice spacing is uneven"):
        read_pet_series(tmp_path / "uneven")

    paths = small_series(tmp_path / "sheared")
    rewrite(paths[2], ImagePositionPatient=[1.0, 0.0, 6.0])
    with pytest.raises(InvalidImageError, match="not stacked along their normal .*1.000 mm"):
        read_pet_series(tmp_path / "sheared")


def test_a_folder_without_pet_or_without_dicom_or_with_a_non_image_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not DICOM")
    with pytest.raises(InvalidImageError, match="no DICOM images .*1 files, 1 not DICOM"):
        read_pet_series(tmp_path / "empty")

    for path in small_series(tmp_path / "ct"):
        rewrite(path, Modality="CT")
    with pytest.raises(InvalidImageError, match=r"no PET \(modality PT\) images, only CT \(6 files\)"):
        read_pet_series(tmp_path / "ct")

    paths = small_series(tmp_path / "report")
    report = pydicom.dcmread(paths[0])
    del report.PixelData
    report.save_as(tmp_path / "report" / "report.dcm")
    with pytest.raises(InvalidImageError, match="report.dcm: DICOM file holds no image"):
        read_pet_series(tmp_path / "report")

    with pytest.raises(UserInputError, match="not a folder"):
        read_pet_series(tmp_path / "absent")


def test_two_series_in_one_folder_are_refused_listing_both(tmp_path):
    small_series(tmp_path / "ac", series_uid="1.2.3.4", series_description="PET AC")
    small_series(tmp_path / "nac", series_uid="1.2.3.5", series_description="PET NAC")
    with pytest.raises(InvalidImageError, match=r"2 PET series: 1.2.3.4 'PET AC' \(6 files\); 1.2.3.5 'PET NAC'"):
        read_pet_series(tmp_path)


def test_other_modalities_and_non_dicom_files_are_skipped_with_a_warning(tmp_path):
    suv = synthetic_suv((6, 5, 6))
    write_pet_series(suv, np.diag([-4.0, -4.0, 3.0, 1.0]), tmp_path / "pet")
    for path in small_series(tmp_path / "ct", series_uid="1.2.3.9"):
        rewrite(path, Modality="CT")
    (tmp_path / "README.txt").write_text("exported by a viewer")
    volume = read_pet_series(tmp_path)
    np.testing.assert_allclose(volume.suv, suv, rtol=5e-3, atol=1e-3)
    assert any("CT (6 files)" in warning for warning in volume.meta["warnings"])
    assert any("skipped 1 files" in warning for warning in volume.meta["warnings"])


# --- the command line ---------------------------------------------------------------------------------------------


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "segany_pet.cli", "suv", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_suv_command_writes_the_nifti_and_refuses_a_bad_series_with_exit_code_2(tmp_path):
    suv, affine = synthetic_suv((6, 5, 6)), oblique_affine()
    write_pet_series(suv, affine, tmp_path / "good", height_m=1.85, sex="M", scan=datetime(2024, 3, 5, 10),
                     series_time=datetime(2024, 3, 5, 10) + timedelta(minutes=30))
    done = run_cli(tmp_path / "good", tmp_path / "out" / "suv.nii.gz", "--norm", "lbm")
    assert done.returncode == 0, done.stderr
    assert "SUVlbm factor" in done.stdout and "earliest AcquisitionDate/AcquisitionTime" in done.stdout
    assert "SeriesTime (0008,0031)" in done.stderr  # the warning: series time after the acquisition
    image = nib.load(tmp_path / "out" / "suv.nii.gz")
    np.testing.assert_allclose(image.affine, affine, atol=1e-4)
    assert image.get_data_dtype() == np.float32
    np.testing.assert_allclose(image.get_fdata(), suv * 60.915 / 75, rtol=5e-3, atol=1e-3)
    record = json.loads((tmp_path / "out" / "suv.json").read_text())
    assert record["suv_norm"] == "lbm" and record["suv_conversion"]["weight_kg"] == 75

    small_series(tmp_path / "uncorrected", decay_correction="NONE")
    done = run_cli(tmp_path / "uncorrected", tmp_path / "bad.nii.gz")
    assert done.returncode == 2
    assert "segany-pet suv: DecayCorrection (0054,1102) is NONE" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "bad.nii.gz").exists()
