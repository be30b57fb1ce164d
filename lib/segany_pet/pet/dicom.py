"""PET DICOM headers to SUV: the QIBA vendor-neutral conversion.

``suv_conversion`` turns the headers of one series into the factors that multiply its rescaled pixel values
(stored value * RescaleSlope + RescaleIntercept, per instance) to give SUV; `segany_pet.pet.dicom_series` reads
a folder holding one series with it. Each refusal names the tag at fault and says what to fix. The rules are
those of the QIBA FDG-PET/CT profile's vendor-neutral SUV pseudo-code; tests/test_dicom.py holds its test
vectors and real vendor headers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import date, datetime, time, timedelta

from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pydicom.valuerep import DA, DT, TM

from segany_pet.errors import InvalidImageError, UserInputError

PET_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.128"

# SUV normalisations: body weight (SUVbw), lean body mass (SUL, Janmahasatian), body surface area (Du Bois).
SUV_NORMS = ("bw", "lbm", "bsa")
NORM_NAMES = {"bw": "SUVbw (body weight)", "lbm": "SUL (lean body mass)", "bsa": "SUVbsa (body surface area)"}

GE_PRIVATE_CREATOR = "GEMS_PETD_01"
GE_SCAN_DATETIME = (0x0009, 0x0D)  # (0009,xx0D) PET scan_datetime, DT
PHILIPS_PRIVATE_CREATOR = "Philips PET Private Group"
PHILIPS_SUV_FACTOR = (0x7053, 0x00)  # (7053,xx00) SUV scale factor: counts -> SUVbw
PHILIPS_ACTIVITY_SCALE = (0x7053, 0x09)  # (7053,xx09) activity concentration scale: counts -> Bq/mL

# Sanity ranges (QIBA): outside them a header was typed in the wrong unit or belongs to another scan.
DOSE_RANGE_BQ = (1e7, 2e10)
DECAY_TIME_RANGE_S = (0.0, 6 * 3600.0)
WEIGHT_RANGE_KG = (1.0, 300.0)
HEIGHT_RANGE_M = (0.3, 2.5)
HEIGHT_IN_CM_ABOVE = 3.0  # nobody is 3 m tall: such a PatientSize was typed in centimetres



def tag_name(keyword: str) -> str:
    """'RadionuclideTotalDose (0018,1074)': what error messages call a tag."""
    tag = Tag(tag_for_keyword(keyword))
    return f"{keyword} ({tag.group:04X},{tag.element:04X})"


@dataclass
class SUVConversion:
    """How one series' pixel values become SUV: every input, the factors, and the warnings on the way.

    ``factors[norm]`` multiplies rescaled pixel values (stored * RescaleSlope + RescaleIntercept): Bq/mL for
    Units BQML (the factor is then in g/Bq, mL of tissue taken as 1 g), counts for CNTS, SUV for GML.
    """

    units: str
    decay_correction: str
    factors: dict[str, float]
    weight_kg: float | None = None
    height_m: float | None = None
    sex: str | None = None
    dose_bq: float | None = None
    half_life_s: float | None = None
    injection_time: str | None = None  # ISO 8601, scanner local time
    scan_time: str | None = None
    scan_time_source: str | None = None
    decay_time_s: float | None = None
    decayed_dose_bq: float | None = None
    activity_scale: float | None = None  # Philips CNTS: Bq/mL per count
    philips_suv_factor: float | None = None
    lean_body_mass_kg: float | None = None
    body_surface_area_m2: float | None = None
    warnings: list[str] = field(default_factory=list)

    def factor(self, norm: str = "bw") -> float:
        if norm not in SUV_NORMS:
            raise UserInputError(f"unknown SUV normalisation {norm!r}: use one of {', '.join(SUV_NORMS)}")
        if norm not in self.factors:
            raise InvalidImageError(self._why_unavailable(norm))
        return self.factors[norm]

    def _why_unavailable(self, norm: str) -> str:
        needs = [tag_name("PatientWeight"), tag_name("PatientSize")]
        if norm == "lbm":
            needs.append(f"{tag_name('PatientSex')} M or F")
        sex = f", sex {self.sex}" if norm == "lbm" else ""
        return (
            f"{NORM_NAMES[norm]} needs {', '.join(needs)}; this series has weight {self.weight_kg} kg, "
            f"size {self.height_m} m{sex}: fill in the header or use SUVbw (norm 'bw')"
        )

    def to_dict(self) -> dict:
        return asdict(self)


def suv_conversion(datasets: Dataset | Sequence[Dataset]) -> SUVConversion:
    """The factors that turn one series' rescaled pixel values into SUV (QIBA vendor-neutral rules).

    ``datasets``: the headers of one PET series. Patient and dose tags are read from the first; all are needed
    for the earliest acquisition time (the scan-time rule) and to check that Philips factors agree.
    Raises InvalidImageError naming the tag for anything that would give a wrong SUV.
    """
    datasets = [datasets] if isinstance(datasets, Dataset) else list(datasets)
    if not datasets:
        raise ValueError("suv_conversion needs at least one dataset")
    first = datasets[0]
    units = _requiredtext_value(first, "Units").upper()
    if units not in ("BQML", "CNTS", "GML"):
        raise InvalidImageError(
            f"{tag_name('Units')} is {units!r}: SUV can be computed from BQML (Bq/mL), CNTS (Philips counts) or "
            "GML (SUV already); export the attenuation-corrected activity image"
        )
    decay_correction = _checked_corrections(first)
    warnings: list[str] = []
    weight_kg = _patient_weight(first)
    height_m = _patient_height(first, warnings)
    sex = str(first.get("PatientSex", "") or "").strip().upper() or None

    conversion = SUVConversion(units, decay_correction, {}, weight_kg, height_m, sex, warnings=warnings)
    if units == "GML":
        bw_factor = 1.0
    elif units == "CNTS":
        conversion.philips_suv_factor = _philips_number(datasets, PHILIPS_SUV_FACTOR, "SUV scale factor")
        if conversion.philips_suv_factor is not None:
            bw_factor = conversion.philips_suv_factor
        else:
            conversion.activity_scale = _philips_number(datasets, PHILIPS_ACTIVITY_SCALE, "activity scale")
            if conversion.activity_scale is None:
                raise InvalidImageError(
                    f"{tag_name('Units')} is CNTS (counts) but the Philips private tags (7053,1000) SUV scale factor "
                    f"and (7053,1009) activity concentration scale, creator '{PHILIPS_PRIVATE_CREATOR}', are "
                    "missing, so counts cannot be turned into activity; export the series in BQML"
                )
            bw_factor = conversion.activity_scale * _grams_per_decayed_becquerel(conversion, datasets)
    else:
        bw_factor = _grams_per_decayed_becquerel(conversion, datasets)

    conversion.factors["bw"] = bw_factor
    if weight_kg is not None and height_m is not None:
        conversion.body_surface_area_m2 = du_bois_bsa_m2(weight_kg, height_m)
        # SUVbsa = A * BSA[cm2] / dose = SUVbw * BSA[cm2] / weight[g]
        conversion.factors["bsa"] = bw_factor * conversion.body_surface_area_m2 * 1e4 / (weight_kg * 1000.0)
        if sex in ("M", "F"):
            conversion.lean_body_mass_kg = janmahasatian_lbm_kg(weight_kg, height_m, sex)
            conversion.factors["lbm"] = bw_factor * conversion.lean_body_mass_kg / weight_kg
    return conversion


def janmahasatian_lbm_kg(weight_kg: float, height_m: float, sex: str) -> float:
    bmi = weight_kg / height_m**2
    if sex == "M":
        return 9270.0 * weight_kg / (6680.0 + 216.0 * bmi)
    return 9270.0 * weight_kg / (8780.0 + 244.0 * bmi)


def du_bois_bsa_m2(weight_kg: float, height_m: float) -> float:
    return 0.007184 * weight_kg**0.425 * (height_m * 100.0) ** 0.725


def _checked_corrections(dataset: Dataset) -> str:
    """The DecayCorrection of an attenuation- and decay-corrected image; refuses anything else."""
    decay_correction = _requiredtext_value(dataset, "DecayCorrection").upper()
    if decay_correction == "NONE":
        raise InvalidImageError(
            f"{tag_name('DecayCorrection')} is NONE: the image is not decay corrected and a per-frame correction "
            "is vendor specific; export a reconstruction decay corrected to the scan start (START)"
        )
    if decay_correction not in ("START", "ADMIN"):
        raise InvalidImageError(f"{tag_name('DecayCorrection')} is {decay_correction!r}: expected START or ADMIN")
    corrected = dataset.get("CorrectedImage")
    if corrected is None:
        raise InvalidImageError(
            f"{tag_name('CorrectedImage')} is missing: SUV needs an image corrected for attenuation (ATTN) and "
            "decay (DECY); export the attenuation-corrected series"
        )
    values = {corrected.upper()} if isinstance(corrected, str) else {str(value).upper() for value in corrected}
    missing = [needed for needed in ("ATTN", "DECY") if needed not in values]
    if missing:
        hint = " (a NAC series: pick the attenuation-corrected one)" if "ATTN" in missing else ""
        raise InvalidImageError(
            f"{tag_name('CorrectedImage')} = {sorted(values)} lacks {' and '.join(missing)}{hint}; SUV needs an "
            "attenuation- and decay-corrected image"
        )
    return decay_correction


def _grams_per_decayed_becquerel(conversion: SUVConversion, datasets: list[Dataset]) -> float:
    """weight[g] / decayed dose[Bq], filling the dose and time inputs of ``conversion`` on the way."""
    first = datasets[0]
    if conversion.weight_kg is None:
        raise InvalidImageError(f"{tag_name('PatientWeight')} is missing or 0: SUVbw needs the patient's weight in kg")
    sequence = first.get("RadiopharmaceuticalInformationSequence")
    if not sequence:
        raise InvalidImageError(
            f"{tag_name('RadiopharmaceuticalInformationSequence')} is missing: the injected dose and its time are "
            "needed for SUV; export the series with its full header"
        )
    radiopharmaceutical = sequence[0]
    dose = _number(radiopharmaceutical, "RadionuclideTotalDose")
    if dose is None:
        raise InvalidImageError(f"{tag_name('RadionuclideTotalDose')} is missing: SUV needs the injected dose in Bq")
    low, high = DOSE_RANGE_BQ
    if not low <= dose <= high:
        hint = (
            f"; {dose:g} looks like MBq: the tag holds Bq ({dose:g} MBq = {dose * 1e6:.4g} Bq)"
            if dose * 1e6 <= high
            else ""
        )
        raise InvalidImageError(
            f"{tag_name('RadionuclideTotalDose')} = {dose:g} Bq is outside {low:g}..{high:g} Bq{hint}; fix the header"
        )
    conversion.dose_bq = dose
    if conversion.decay_correction == "ADMIN":
        # Already decay corrected to the injection: the whole dose counts.
        conversion.decayed_dose_bq = dose
        return conversion.weight_kg * 1000.0 / dose

    half_life = _number(radiopharmaceutical, "RadionuclideHalfLife")
    if half_life is None or half_life <= 0:
        raise InvalidImageError(
            f"{tag_name('RadionuclideHalfLife')} is missing or not positive: the decay to the scan start needs "
            "the half-life in seconds (F-18: 6586.2)"
        )
    scan, source = _scan_time(datasets, conversion.warnings)
    injection, injection_source = _injection_time(radiopharmaceutical, scan)
    decay_time = (scan - injection).total_seconds()
    low, high = DECAY_TIME_RANGE_S
    if not low <= decay_time <= high:
        raise InvalidImageError(
            f"decay time from injection ({injection_source} {injection:%Y-%m-%d %H:%M:%S}) to scan ({source} "
            f"{scan:%Y-%m-%d %H:%M:%S}) is {decay_time / 3600:.2f} h, outside 0..6 h; check {injection_source} "
            "and the series date and time"
        )
    conversion.half_life_s = half_life
    conversion.injection_time = injection.isoformat()
    conversion.scan_time = scan.isoformat()
    conversion.scan_time_source = source
    conversion.decay_time_s = decay_time
    conversion.decayed_dose_bq = dose * 2.0 ** (-decay_time / half_life)
    return conversion.weight_kg * 1000.0 / conversion.decayed_dose_bq


def _injection_time(radiopharmaceutical: Dataset, scan: datetime) -> tuple[datetime, str]:
    """The injection datetime and the tag it came from: the start datetime, else the start time on the scan's date."""
    keyword = "RadiopharmaceuticalStartDateTime"
    start = _parse_datetime(radiopharmaceutical.get(keyword), keyword)
    if start is not None:
        return start, tag_name(keyword)
    keyword = "RadiopharmaceuticalStartTime"
    start_time = _parse_time(radiopharmaceutical.get(keyword), keyword)
    if start_time is None:
        raise InvalidImageError(
            f"{tag_name('RadiopharmaceuticalStartDateTime')} and {tag_name(keyword)} are both missing: SUV needs "
            "the injection time"
        )
    injection = datetime.combine(scan.date(), start_time)
    if injection > scan:  # a negative decay time: injected before midnight, scanned after
        injection -= timedelta(days=1)
    return injection, tag_name(keyword)


def _scan_time(datasets: list[Dataset], warnings: list[str]) -> tuple[datetime, str]:
    """The time the image is decay corrected to (DecayCorrection START), and which tag gave it.

    SeriesDate/Time, unless it is after the earliest acquisition (a series re-created by post-processing gets a
    new series time); then GE's private scan datetime; else the earliest acquisition, with a warning.
    """
    first = datasets[0]
    series = _date_and_time(first, "SeriesDate", "SeriesTime")
    acquisitions = [time for time in (_acquisition_time(dataset) for dataset in datasets) if time is not None]
    earliest = min(acquisitions, default=None)
    if series is not None and (earliest is None or series <= earliest):
        return series, "SeriesDate/SeriesTime"
    text = _privatetext_value(first, GE_SCAN_DATETIME, GE_PRIVATE_CREATOR)
    if text is not None:
        ge_scan = _parse_datetime(text, "GE private scan datetime (0009,xx0D)")
        if ge_scan is not None:
            return ge_scan, f"GE private scan datetime (0009,xx0D), creator {GE_PRIVATE_CREATOR}"
    if earliest is None:
        raise InvalidImageError(
            f"{tag_name('SeriesTime')} and {tag_name('AcquisitionTime')} are missing: the scan time is needed to "
            "correct the dose for decay"
        )
    if series is None:
        warnings.append(
            f"{tag_name('SeriesDate')}/{tag_name('SeriesTime')} missing: decay corrected to the earliest "
            f"acquisition time {earliest:%Y-%m-%d %H:%M:%S.%f}"
        )
    else:
        warnings.append(
            f"{tag_name('SeriesTime')} {series:%H:%M:%S.%f} is after the earliest {tag_name('AcquisitionTime')} "
            f"{earliest:%H:%M:%S.%f} (a series re-created after the scan?): decay corrected to the earliest "
            "acquisition time"
        )
    return earliest, "earliest AcquisitionDate/AcquisitionTime"


def _acquisition_time(dataset: Dataset) -> datetime | None:
    combined = _parse_datetime(dataset.get("AcquisitionDateTime"), "AcquisitionDateTime")
    if combined is not None:
        return combined
    acquisition = _date_and_time(dataset, "AcquisitionDate", "AcquisitionTime")
    if acquisition is None and dataset.get("AcquisitionTime") and dataset.get("SeriesDate"):
        acquisition = _date_and_time(dataset, "SeriesDate", "AcquisitionTime")
    return acquisition


def _date_and_time(dataset: Dataset, date_keyword: str, time_keyword: str) -> datetime | None:
    day = _parse_date(dataset.get(date_keyword), date_keyword)
    moment = _parse_time(dataset.get(time_keyword), time_keyword)
    if day is None or moment is None:
        return None
    return datetime.combine(day, moment)


def _parse_date(value, keyword: str) -> date | None:
    text = text_value(value)
    if text is None:
        return None
    try:
        parsed = DA(text)
    except ValueError as exc:
        raise InvalidImageError(f"{tag_name(keyword)} = {text!r} is not a DICOM date (YYYYMMDD)") from exc
    return date(parsed.year, parsed.month, parsed.day)


def _parse_time(value, keyword: str) -> time | None:
    text = text_value(value)
    if text is None:
        return None
    try:
        parsed = TM(text.replace(":", ""))  # colons: the pre-2003 form some old scanners still write
    except ValueError as exc:
        raise InvalidImageError(f"{tag_name(keyword)} = {text!r} is not a DICOM time (HHMMSS.FFFFFF)") from exc
    return time(parsed.hour, parsed.minute, parsed.second, parsed.microsecond)


def _parse_datetime(value, name: str) -> datetime | None:
    """A DT value as naive local time; None when absent or holding no time of day (a date alone is no time)."""
    text = text_value(value)
    if text is None:
        return None
    label = tag_name(name) if tag_for_keyword(name) else name
    if len(text.split("+")[0].split("-")[0].split(".")[0]) < 12:
        return None
    try:
        parsed = DT(text)
    except ValueError as exc:
        raise InvalidImageError(f"{label} = {text!r} is not a DICOM datetime (YYYYMMDDHHMMSS.FFFFFF)") from exc
    # The UTC offset, when present, describes the same local clock the series and acquisition times use.
    return datetime(parsed.year, parsed.month, parsed.day, parsed.hour, parsed.minute, parsed.second,
                    parsed.microsecond)


def text_value(value) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    text = str(value).strip(" \x00")
    return text or None


def _number(dataset: Dataset, keyword: str) -> float | None:
    value = dataset.get(keyword)
    if value is None or value == "":
        return None
    try:
        number = float(value)
    except (TypeError, ValueError) as exc:
        raise InvalidImageError(f"{tag_name(keyword)} = {value!r} is not a number; fix the header") from exc
    if not math.isfinite(number):
        raise InvalidImageError(f"{tag_name(keyword)} = {value!r} is not a finite number; fix the header")
    return number


def _requiredtext_value(dataset: Dataset, keyword: str) -> str:
    text = text_value(dataset.get(keyword))
    if text is None:
        raise InvalidImageError(f"{tag_name(keyword)} is missing: a PET image header must hold it")
    return text


def _patient_weight(dataset: Dataset) -> float | None:
    weight = _number(dataset, "PatientWeight")
    if weight is None or weight == 0:  # 0 is how many consoles say "not entered"
        return None
    low, high = WEIGHT_RANGE_KG
    if not low <= weight <= high:
        raise InvalidImageError(f"{tag_name('PatientWeight')} = {weight:g} kg is outside {low:g}..{high:g} kg; fix it")
    return weight


def _patient_height(dataset: Dataset, warnings: list[str]) -> float | None:
    height = _number(dataset, "PatientSize")
    if height is None or height == 0:
        return None
    if height > HEIGHT_IN_CM_ABOVE:
        warnings.append(f"{tag_name('PatientSize')} = {height:g} taken as centimetres ({height / 100:g} m)")
        height /= 100.0
    low, high = HEIGHT_RANGE_M
    if not low <= height <= high:
        raise InvalidImageError(f"{tag_name('PatientSize')} = {height:g} m is outside {low:g}..{high:g} m; fix it")
    return height


def _privatetext_value(dataset: Dataset, tag: tuple[int, int], creator: str) -> str | None:
    group, offset = tag
    try:
        block = dataset.private_block(group, creator)
    except KeyError:
        return None
    if offset not in block:
        return None
    return text_value(block[offset].value)  # bytes when the VR is unknown (implicit VR files)


def _philips_number(datasets: list[Dataset], tag: tuple[int, int], what: str) -> float | None:
    """A Philips private factor, which must be the same in every slice (one factor converts the series)."""
    label = f"Philips private ({tag[0]:04X},10{tag[1]:02X}) {what}"
    texts = [_privatetext_value(dataset, tag, PHILIPS_PRIVATE_CREATOR) for dataset in datasets]
    if all(text is None for text in texts):
        return None
    try:
        values = [float(text) if text is not None else math.nan for text in texts]
    except ValueError as exc:
        raise InvalidImageError(f"{label} is not a number ({exc}); re-export the series in BQML") from exc
    first = values[0]
    if not all(math.isfinite(value) and value > 0 for value in values):
        raise InvalidImageError(f"{label} is missing, 0 or negative in some slices; re-export the series in BQML")
    if any(abs(value - first) > 1e-6 * abs(first) for value in values):
        raise InvalidImageError(
            f"{label} differs across slices ({min(values):g}..{max(values):g}); re-export the series in BQML"
        )
    return first
