"""Where a curated cohort comes from: the config file, its sources, and the cases each source's layout holds.

A config (YAML or JSON) lists sources; each names a layout, a folder, the tracer, the label tier and how its
label values map to the project's target vocabulary (`TARGETS`)::

    sources:
      - name: autopet_fdg            # case ids become <name>__<case>
        layout: autopet              # autopet | nnunet | dicom | nifti
        path: /data/FDG-PET-CT-Lesions
        tracer: fdg                  # or "from_case_name": the case name starts with the tracer (nnU-Net merges)
        tier: high                   # high (expert) | low (noisy): the label info's "quality"
        targets: {1: lesion}         # label value (nnU-Net: label name) -> target name
        note: "TCIA, CC BY 4.0"      # licence / source, kept in every case's provenance

Layouts (``path`` is the source's root; relative paths in a config are relative to the config file):

- ``autopet``: a folder per study (any depth) with ``SUV.nii.gz``, optionally ``SEG.nii.gz`` (lesions) and
  ``CTres.nii.gz``; a study with only ``PET.nii.gz`` (Bq/mL) is converted with its row of ``metadata`` (a CSV
  with ``study`` = the study folder relative to ``path``, ``weight_kg``, ``dose_bq``, ``injection_to_scan_s``
  and optionally ``half_life_s``, default F-18).
- ``nnunet``: ``dataset.json`` (``channel_names``, ``labels``, ``file_ending``), ``imagesTr/<case>_<channel>``
  and ``labelsTr/<case>``; ``imagesTs`` cases come in unlabeled. The PET channel is the one named PET or SUV,
  or ``channel``; ``targets`` maps dataset.json's label names.
- ``dicom``: folders of DICOM PET series (`segany_pet.pet.dicom_files.series_folders`), converted with the
  QIBA rules; ``labels``: a folder of NIfTI labels named ``<series id>.nii.gz`` (the id as in the server's
  DICOM import: the series folder's path with ``__`` between its parts).
- ``nifti``: ``images`` and ``labels`` patterns relative to ``path`` with one ``{case}`` each, e.g.
  ``pet/{case}_suv.nii.gz`` and ``seg/{case}_seg.nii.gz``; images without a label come in unlabeled.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from segany_pet.errors import UserInputError
from segany_pet.pet.dicom_files import is_dicom_file, series_folders, series_id
from segany_pet.pet.organs import ORGAN_NAMES

# The target vocabulary of every curated datastore: label value of each target name. Lesions are 1 (the app's
# and the trainer's default); organ k of the phantom atlas is 1 + k, as the default model's --organs training.
TARGETS: dict[str, int] = {"lesion": 1, **{name: value + 1 for value, name in ORGAN_NAMES.items()}}
LAYOUTS = ("autopet", "nnunet", "dicom", "nifti")
TIERS = ("high", "low")
TRACER_FROM_CASE_NAME = "from_case_name"
KNOWN_TRACERS = ("fdg", "psma")
F18_HALF_LIFE_S = 6586.2
NIFTI_ENDINGS = (".nii.gz", ".nii")
ID_SEPARATOR = "__"


@dataclass(frozen=True)
class Source:
    name: str
    layout: str
    path: Path
    tracer: str
    tier: str = "high"
    # Label value (int; nnU-Net: label name) -> target name; autoPET's SEG.nii.gz marks lesions with 1.
    targets: dict = field(default_factory=lambda: {1: "lesion"})
    note: str = ""
    metadata: Path | None = None  # autopet: the CSV for PET.nii.gz studies
    channel: int | None = None  # nnunet: the PET channel, when dataset.json does not name one PET or SUV
    images: str = ""  # nifti: pattern with {case}
    labels: str = ""  # nifti: pattern with {case}; dicom: a folder of NIfTI labels

    def tracer_of(self, case: str) -> str:
        if self.tracer != TRACER_FROM_CASE_NAME:
            return self.tracer
        lowered = case.lower()
        for tracer in KNOWN_TRACERS:
            if lowered.startswith(tracer):
                return tracer
        raise UserInputError(f"source {self.name}: case {case} does not start with a tracer name "
                             f"({', '.join(KNOWN_TRACERS)}); give the source a tracer")


@dataclass(frozen=True)
class Case:
    """One case of a source: what a worker reads, and the id it gets in the datastore."""

    source: Source
    name: str  # the case's name within its source
    image: Path  # a NIfTI file, or a DICOM series folder
    label: Path | None = None
    kind: str = "suv"  # "suv" (NIfTI SUV), "bqml" (NIfTI Bq/mL + suv_inputs), "dicom" (a series folder)
    suv_inputs: dict | None = None  # bqml: weight_kg, dose_bq, injection_to_scan_s, half_life_s

    @property
    def id(self) -> str:
        return case_id(self.source.name, self.name)

    def files(self) -> list[Path]:
        """The files the case is read from (its fingerprint's inputs)."""
        folder = [self.image] if self.kind != "dicom" else sorted(p for p in self.image.iterdir() if p.is_file())
        return [*folder, *([self.label] if self.label else [])]

    def fingerprint(self) -> str:
        """Changes when any input file changes (path, size or modification time): re-import then."""
        parts = []
        for path in self.files():
            stat = path.stat()
            parts.append(f"{path}:{stat.st_size}:{stat.st_mtime_ns}")
        if self.suv_inputs:
            parts.append(json.dumps(self.suv_inputs, sort_keys=True))
        return hashlib.blake2b("\n".join(parts).encode(), digest_size=16).hexdigest()


def case_id(source: str, case: str) -> str:
    """A datastore id: letters, digits, '.', '-' and '_' only (ids travel in URLs and file names)."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", case).strip("_.") or "case"
    return f"{source}{ID_SEPARATOR}{cleaned}"


# ----------------------------------------------------------------------------------------------
# The config


def load_config(path: str | os.PathLike) -> list[Source]:
    """The sources of a YAML or JSON config, checked; every mistake is named with its source."""
    path = Path(path)
    try:
        record = yaml.safe_load(path.read_text())
    except FileNotFoundError as exc:
        raise UserInputError(f"config {path} does not exist") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise UserInputError(f"config {path} cannot be read as text ({exc})") from exc
    except yaml.YAMLError as exc:
        raise UserInputError(f"config {path} is not valid YAML or JSON: {exc}") from exc
    if not isinstance(record, dict) or not isinstance(record.get("sources"), list) or not record["sources"]:
        raise UserInputError(f"config {path}: expected a 'sources' list with at least one source")
    sources = [parse_source(entry, path.parent, index) for index, entry in enumerate(record["sources"], start=1)]
    names = [source.name for source in sources]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise UserInputError(f"config {path}: source names must be unique; repeated: {', '.join(repeated)}")
    return sources


SOURCE_FIELDS = {"name", "layout", "path", "tracer", "tier", "targets", "note", "metadata", "channel", "images",
                 "labels"}


def parse_source(entry, base: Path, index: int) -> Source:
    where = f"source {index}" + (f" ({entry.get('name')})" if isinstance(entry, dict) and entry.get("name") else "")
    if not isinstance(entry, dict):
        raise UserInputError(f"{where}: expected a mapping of fields")
    unknown = sorted(set(entry) - SOURCE_FIELDS)
    if unknown:
        raise UserInputError(f"{where}: unknown field(s) {', '.join(unknown)}; "
                             f"known: {', '.join(sorted(SOURCE_FIELDS))}")
    missing = [key for key in ("name", "layout", "path", "tracer") if not entry.get(key)]
    if missing:
        raise UserInputError(f"{where}: missing {', '.join(missing)}")
    name = str(entry["name"])
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name) or ID_SEPARATOR in name:
        raise UserInputError(f"{where}: name {name!r} may hold letters, digits, '.', '-' and single '_' only")
    if entry["layout"] not in LAYOUTS:
        raise UserInputError(f"{where}: layout {entry['layout']!r} is not one of {', '.join(LAYOUTS)}")
    tier = str(entry.get("tier", "high"))
    if tier not in TIERS:
        raise UserInputError(f"{where}: tier {tier!r} is not one of {', '.join(TIERS)}")
    root = _resolve(entry["path"], base)
    if not root.is_dir():
        raise UserInputError(f"{where}: path {root} is not a folder")
    targets = entry.get("targets") or {}
    if not isinstance(targets, dict):
        raise UserInputError(f"{where}: targets must map label values (or names) to target names")
    for key, target in targets.items():
        if target not in TARGETS:
            raise UserInputError(f"{where}: target {target!r} (for label {key!r}) is not in the vocabulary: "
                                 f"{', '.join(TARGETS)}")
    if entry["layout"] != "nnunet":
        try:
            targets = {int(key): target for key, target in targets.items()}
        except (TypeError, ValueError) as exc:
            raise UserInputError(f"{where}: targets keys must be label values (integers)") from exc
        if any(key <= 0 for key in targets):
            raise UserInputError(f"{where}: label value 0 is background; map positive values only")
        targets = targets or {1: "lesion"}
    if entry["layout"] == "nifti" and not all("{case}" in str(entry.get(key, "")) for key in ("images", "labels")):
        raise UserInputError(f"{where}: the nifti layout needs 'images' and 'labels' patterns with {{case}} in each")
    metadata = _resolve(entry["metadata"], base) if entry.get("metadata") else None
    if metadata is not None and not metadata.is_file():
        raise UserInputError(f"{where}: metadata {metadata} is not a file")
    return Source(name=name, layout=entry["layout"], path=root, tracer=str(entry["tracer"]).lower(), tier=tier,
                  targets=targets, note=str(entry.get("note", "")), metadata=metadata,
                  channel=None if entry.get("channel") is None else int(entry["channel"]),
                  images=str(entry.get("images", "")), labels=str(entry.get("labels", "")))


def _resolve(value, base: Path) -> Path:
    path = Path(os.path.expanduser(str(value)))
    return path if path.is_absolute() else (base / path).resolve()


# ----------------------------------------------------------------------------------------------
# Layouts -> cases


def find_cases(source: Source) -> list[Case]:
    """Every case of the source, sorted by name; a layout the folder does not follow is a clear error."""
    finder = {"autopet": _autopet_cases, "nnunet": _nnunet_cases, "dicom": _dicom_cases, "nifti": _nifti_cases}
    cases = sorted(finder[source.layout](source), key=lambda case: case.name)
    for case in cases:
        source.tracer_of(case.name)  # a case without a tracer is a config mistake: say so before importing
    return cases


def _autopet_cases(source: Source) -> list[Case]:
    metadata = _read_metadata(source) if source.metadata else {}
    cases = []
    for folder, subfolders, files in os.walk(source.path):
        subfolders.sort()
        names = set(files)
        if "SUV.nii.gz" not in names and "PET.nii.gz" not in names:
            continue
        folder = Path(folder)
        study = folder.relative_to(source.path).as_posix()
        label = folder / "SEG.nii.gz" if "SEG.nii.gz" in names else None
        if "SUV.nii.gz" in names:
            cases.append(Case(source, study, folder / "SUV.nii.gz", label))
        else:  # Bq/mL: converted with the metadata row, or refused by the worker for want of one
            cases.append(Case(source, study, folder / "PET.nii.gz", label, kind="bqml",
                              suv_inputs=metadata.get(study)))
    if not cases:
        raise UserInputError(f"source {source.name}: no study folder with SUV.nii.gz or PET.nii.gz under "
                             f"{source.path}: is the layout autopet?")
    return cases


def _read_metadata(source: Source) -> dict[str, dict]:
    """autoPET studies' SUV inputs by study folder, from the source's metadata CSV."""
    required = ("study", "weight_kg", "dose_bq", "injection_to_scan_s")
    with open(source.metadata, newline="") as file:
        rows = list(csv.DictReader(file))
    if rows and not set(required) <= set(rows[0]):
        raise UserInputError(f"source {source.name}: metadata {source.metadata} needs the columns "
                             f"{', '.join(required)} (half_life_s optional)")
    inputs = {}
    for number, row in enumerate(rows, start=2):
        try:
            inputs[row["study"].strip().strip("/")] = {
                "weight_kg": float(row["weight_kg"]), "dose_bq": float(row["dose_bq"]),
                "injection_to_scan_s": float(row["injection_to_scan_s"]),
                "half_life_s": float(row.get("half_life_s") or F18_HALF_LIFE_S)}
        except ValueError as exc:
            raise UserInputError(f"source {source.name}: metadata {source.metadata} line {number}: {exc}") from exc
    return inputs


def _nnunet_cases(source: Source) -> list[Case]:
    description = source.path / "dataset.json"
    try:
        dataset = json.loads(description.read_text())
    except FileNotFoundError as exc:
        raise UserInputError(f"source {source.name}: no dataset.json in {source.path}: is the layout nnunet?") from exc
    except json.JSONDecodeError as exc:
        raise UserInputError(f"source {source.name}: {description} is not valid JSON ({exc})") from exc
    ending = dataset.get("file_ending", ".nii.gz")
    channels = {int(k): str(v) for k, v in (dataset.get("channel_names") or dataset.get("modality") or {}).items()}
    channel = source.channel
    if channel is None:
        named = [k for k, v in channels.items() if v.strip().upper() in ("PET", "SUV", "PT")]
        if len(named) != 1:
            raise UserInputError(f"source {source.name}: dataset.json channel_names {channels} name no single PET "
                                 "channel; give the source a 'channel'")
        channel = named[0]
    if channel not in channels:
        raise UserInputError(f"source {source.name}: channel {channel} is not in dataset.json ({channels})")
    values = {}
    for name, value in (dataset.get("labels") or {}).items():
        if isinstance(value, list):  # nnU-Net v2 region-based labels: not a label map this tool can read
            raise UserInputError(f"source {source.name}: label {name!r} is region-based; export plain labels")
        if int(value) == 0:
            continue
        target = source.targets.get(name) or (name if name in TARGETS else None)
        if target is None:
            raise UserInputError(f"source {source.name}: dataset.json label {name!r} ({value}) has no target; add "
                                 f"targets: {{{name}: lesion}} (or another of {', '.join(TARGETS)})")
        values[int(value)] = target
    if not values:
        raise UserInputError(f"source {source.name}: dataset.json lists no foreground label")
    source_targets = Source(**{**source.__dict__, "targets": values})
    cases = []
    for images, labels in (("imagesTr", "labelsTr"), ("imagesTs", None)):
        folder = source.path / images
        if not folder.is_dir():
            continue
        suffix = f"_{channel:04d}{ending}"
        for image in sorted(folder.glob(f"*{suffix}")):
            name = image.name[: -len(suffix)]
            label = source.path / labels / f"{name}{ending}" if labels else None
            cases.append(Case(source_targets, name, image, label if label and label.exists() else None))
    if not cases:
        raise UserInputError(f"source {source.name}: no imagesTr/<case>_{channel:04d}{ending} under {source.path}")
    return cases


def _dicom_cases(source: Source) -> list[Case]:
    """Series folders; a folder of DICOM-SEG files labels the series its SEGs reference (one header read per
    folder: a SEG export keeps its own series folder, as PACS exports do)."""
    labels = _resolve(source.labels, source.path) if source.labels else None
    if labels is not None and not labels.is_dir():
        raise UserInputError(f"source {source.name}: labels {labels} is not a folder")
    series, segs = [], {}
    for folder in series_folders(source.path):
        if labels is not None and folder.resolve().is_relative_to(labels.resolve()):
            continue
        files = sorted(p for p in folder.iterdir() if p.is_file() and is_dicom_file(p))
        header = _dicom_header(files[0])
        if header is not None and header.get("Modality") == "SEG":
            for file in files:
                referenced = _dicom_header(file)
                for item in (referenced or {}).get("ReferencedSeriesSequence", []):
                    segs.setdefault(str(item.SeriesInstanceUID), file)
        else:
            series.append((folder, str((header or {}).get("SeriesInstanceUID", ""))))
    cases = []
    for folder, uid in series:
        name = series_id(folder, source.path)
        label = next((labels / f"{name}{ending}" for ending in NIFTI_ENDINGS
                      if labels is not None and (labels / f"{name}{ending}").exists()), segs.get(uid))
        cases.append(Case(source, name, folder, label, kind="dicom"))
    if not cases:
        raise UserInputError(f"source {source.name}: no folder of DICOM files under {source.path}")
    return cases


def _dicom_header(path: Path):
    import pydicom

    try:
        return pydicom.dcmread(path, stop_before_pixels=True,
                               specific_tags=["Modality", "SeriesInstanceUID", "ReferencedSeriesSequence"])
    except Exception:  # a damaged file: the series reader names it when the case is read
        return None


def _nifti_cases(source: Source) -> list[Case]:
    pattern = re.compile(re.escape(source.images).replace(re.escape("{case}"), "(?P<case>.+)") + "$")
    cases = []
    for image in sorted(source.path.glob(source.images.replace("{case}", "*"))):
        match = pattern.match(image.relative_to(source.path).as_posix())
        if not match:
            continue
        label = source.path / source.labels.replace("{case}", match["case"])
        cases.append(Case(source, match["case"], image, label if label.exists() else None))
    if not cases:
        raise UserInputError(f"source {source.name}: nothing matches {source.images} under {source.path}")
    return cases
