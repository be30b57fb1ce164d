"""Training data: records, loaded cases with their objects, and the crops a training step sees.

A record is ``{"id", "image": path, "label": path, "tier": "high" | "low"}``. The label is a NIfTI on the
image's grid whose non-zero integer values are target classes (``label_names``, default lesion = 1). The
objects a prompt can select are the 26-connected components of the classes in ``split_classes`` (lesions:
one click, one lesion) and each other class as a whole (organs).

Choices, documented where a user meets them:
- A label without any target voxel is skipped with a warning, not trained on: in a datastore it is as often
  an unfinished annotation as a negative study, and its lesions would otherwise become "non-target uptake".
  Only when every label is empty is it an error.
- Crops centred on hot non-target structures (physiological uptake above the 99.75th percentile of the
  non-target voxels, as the autoPET IV background clicks) are clicked positively and have an EMPTY target:
  the model segments the labelled classes only, so a click on the bladder gives nothing. When an organ is a
  labelled class it is an ordinary object, never such a "hot spot".
- A lesion "sits in uptake" when at least ``UPTAKE_NEIGHBOUR_SHARE`` of the shell two voxels outside it (other
  targets excluded) is above ``UPTAKE_NEIGHBOUR_FRACTION`` of its SUVmax: there a threshold leaks, and the
  model must find the edge itself. The sampler can draw such lesions more often (``touching_weight``).
  On 40 training phantoms this flag agrees with the phantoms' own "touches an organ" record for 77% of the
  347 lesions.
- Everything is cropped, resampled and normalised by the predictor's own functions (`CropGeometry.around`,
  `crop_volume`, `normalise`): one path for training and inference.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from scipy import ndimage

from segany_pet.crops import CropGeometry, crop_volume, normalise, translation
from segany_pet.errors import UserInputError
from segany_pet.model import Preset
from segany_pet.pet import PETVolume, load_nifti
from segany_pet.pet.quantify import LESION_CONNECTIVITY
from segany_pet.prompts import centre_click

log = logging.getLogger(__name__)

TIERS = ("high", "low")
DEFAULT_LABEL_NAMES = {"lesion": 1}
DEFAULT_SPLIT_CLASSES = ("lesion",)
NIFTI_SUFFIXES = (".nii.gz", ".nii")
# Hot non-target structures: voxels above this percentile of the non-target SUV, as autoPET IV's background
# clicks; targets are first grown by HOT_SPOT_TARGET_MARGIN voxels so a lesion's blurred rim is not one.
HOT_SPOT_PERCENTILE = 99.75
HOT_SPOT_TARGET_MARGIN = 2
HOT_SPOT_MIN_ML = 0.5
HOT_SPOTS_PER_CASE = 20
AFFINE_TOLERANCE_MM = 1e-3
UPTAKE_NEIGHBOUR_FRACTION = 0.41  # the EANM threshold: what a 41% region would leak into
UPTAKE_NEIGHBOUR_SHARE = 0.05


class TrainingDataError(UserInputError):
    """Training records or files that cannot be trained on; the message names the case and what to fix."""


# ----------------------------------------------------------------------------------------------
# Records


def records_from_datastore(datastore, tag: str = "final") -> list[dict]:
    """Records of every image with a label of ``tag`` in a MONAI Label datastore.

    The tier is the label info's ``quality`` ("high" when absent), as the annotation tools save it.
    """
    records = []
    for image_id in sorted(datastore.get_labeled_images(tag)):
        label_id = datastore.get_label_by_image_id(image_id, tag)
        if not label_id:
            continue
        info = datastore.get_label_info(label_id, tag) or {}
        records.append(
            {
                "id": image_id,
                "image": datastore.get_image_uri(image_id),
                "label": datastore.get_label_uri(label_id, tag),
                "tier": info.get("quality", "high"),
            }
        )
    if not records:
        raise TrainingDataError(f"the datastore holds no labeled images (tag {tag!r}): save some labels first")
    return check_records(records)


def _case_id(path: Path) -> str | None:
    for suffix in NIFTI_SUFFIXES:
        if path.name.endswith(suffix):
            return path.name[: -len(suffix)]
    return None


def records_from_folder(images_dir, labels_dir, tiers: str | dict | None = None) -> list[dict]:
    """Records pairing ``images_dir/<id>.nii[.gz]`` with ``labels_dir/<id>.nii[.gz]``.

    Images without a label are left out (unlabeled, as in a datastore). ``tiers``: None (all "high"), one
    tier for all, or ``{id: tier}`` (missing ids are "high").
    """
    images_dir, labels_dir = Path(images_dir), Path(labels_dir)
    for folder in (images_dir, labels_dir):
        if not folder.is_dir():
            raise TrainingDataError(f"{folder} is not a folder")
    labels = {_case_id(p): p for p in sorted(labels_dir.iterdir()) if _case_id(p)}
    records = []
    for image in sorted(images_dir.iterdir()):
        case = _case_id(image)
        if case is None or case not in labels:
            continue
        tier = tiers if isinstance(tiers, str) else (tiers or {}).get(case, "high")
        records.append({"id": case, "image": str(image), "label": str(labels[case]), "tier": tier})
    if not records:
        raise TrainingDataError(
            f"no labeled images: no file in {labels_dir} has the name of an image in {images_dir} "
            "(labels must be named like their image, <id>.nii.gz)"
        )
    return check_records(records)


def check_records(records) -> list[dict]:
    """Records as plain dicts, checked for keys, tiers, unique ids and existing files."""
    records = [dict(r) for r in records or ()]
    if not records:
        raise TrainingDataError("no labeled images to train on")
    seen = Counter(str(r.get("id")) for r in records)
    doubles = sorted(case for case, n in seen.items() if n > 1)
    if doubles:
        raise TrainingDataError(f"record ids must be unique; repeated: {', '.join(doubles)}")
    for record in records:
        missing = [key for key in ("id", "image", "label") if not record.get(key)]
        if missing:
            raise TrainingDataError(f"record {record!r} lacks {', '.join(missing)}")
        record.setdefault("tier", "high")
        if record["tier"] not in TIERS:
            raise TrainingDataError(
                f"case {record['id']}: tier {record['tier']!r} is not one of {TIERS} (label info 'quality')"
            )
        for key in ("image", "label"):
            if not os.path.isfile(record[key]):
                raise TrainingDataError(f"case {record['id']}: {key} file {record[key]} does not exist")
    return records


# ----------------------------------------------------------------------------------------------
# Cases and their objects


@dataclass
class TrainingObject:
    """One thing a prompt can select: a lesion (component) or a whole class."""

    instance: int  # value in the case's instance map
    class_name: str
    voxels: int
    centre_mm: np.ndarray  # world position of its deepest voxel: where crops are centred (then jittered)
    box: tuple[slice, slice, slice]  # bounding box in stored voxels
    in_uptake: bool = False  # a split-class object beside uptake a threshold would leak into (module docstring)


@dataclass
class TrainingCase:
    record: dict
    volume: PETVolume
    instances: np.ndarray  # int32, 0 background, one id per TrainingObject
    objects: list[TrainingObject]
    hot_spots: list[tuple[int, int, int]] = field(default_factory=list)  # stored voxels of non-target uptake

    @property
    def id(self) -> str:
        return str(self.record["id"])

    @property
    def tier(self) -> str:
        return self.record.get("tier", "high")

    def class_instances(self, class_name: str) -> np.ndarray:
        """Instance ids of one class on the image grid (0 elsewhere): the ground truth for evaluation."""
        ids = [o.instance for o in self.objects if o.class_name == class_name]
        return np.where(np.isin(self.instances, ids), self.instances, 0)


def _read_label(record: dict, volume: PETVolume) -> np.ndarray:
    case = record["id"]
    try:
        image = nib.load(str(record["label"]))
        data = np.asanyarray(image.dataobj)
    except Exception as error:
        raise TrainingDataError(f"case {case}: label {record['label']} cannot be read as NIfTI ({error})") from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.shape != volume.shape:
        raise TrainingDataError(
            f"case {case}: label shape {tuple(data.shape)} differs from the image's {volume.shape}; labels must "
            "be on the image's own grid"
        )
    if not np.allclose(image.affine, volume.affine, rtol=0, atol=AFFINE_TOLERANCE_MM):
        raise TrainingDataError(
            f"case {case}: label affine differs from the image's (max difference "
            f"{np.abs(image.affine - volume.affine).max():.4g} mm); labels must be on the image's own grid"
        )
    if not np.issubdtype(data.dtype, np.integer):
        if not np.all(np.isfinite(data)) or np.any(data != np.round(data)):
            raise TrainingDataError(f"case {case}: label holds non-integer values; save class ids as integers")
    return data.astype(np.int32)


def load_case(
    record: dict,
    label_names: dict[str, int] | None = None,
    split_classes: Collection[str] = DEFAULT_SPLIT_CLASSES,
) -> TrainingCase | None:
    """Read and check one record; None (with a warning) when its label holds no target voxel."""
    label_names = dict(label_names or DEFAULT_LABEL_NAMES)
    volume = load_nifti(record["image"])
    label = _read_label(record, volume)
    values = set(np.unique(label).tolist()) - {0}
    unknown = sorted(values - set(label_names.values()))
    if unknown:
        raise TrainingDataError(
            f"case {record['id']}: label values {unknown} are not classes of label_names {label_names}; "
            "add them to label_names or fix the label"
        )
    if not values:
        log.warning("case %s: label is empty (no target voxel); skipped", record["id"])
        return None
    instances = np.zeros(label.shape, dtype=np.int32)
    names = {}
    for name, value in label_names.items():
        mask = label == value
        if not mask.any():
            continue
        if name in split_classes:
            components, count = ndimage.label(mask, structure=LESION_CONNECTIVITY)
            instances[mask] = components[mask] + len(names)
            names.update({len(names) + i: name for i in range(1, count + 1)})
        else:
            names[len(names) + 1] = name
            instances[mask] = len(names)
    counts = np.bincount(instances.ravel(), minlength=len(names) + 1)
    objects = []
    for instance, box in enumerate(ndimage.find_objects(instances), start=1):
        centre = centre_click(instances[box] == instance, volume.spacing)
        centre = [c + s.start for c, s in zip(centre, box, strict=True)]
        in_uptake = names[instance] in split_classes and _in_uptake(volume.suv, instances, instance, box)
        objects.append(TrainingObject(instance, names[instance], int(counts[instance]),
                                      volume.index_to_world(centre), box, in_uptake))
    return TrainingCase(dict(record), volume, instances, objects, _hot_spots(volume, instances))


def _in_uptake(suv: np.ndarray, instances: np.ndarray, instance: int, box) -> bool:
    """Whether the shell two voxels outside the object holds enough uptake for a threshold to leak into."""
    grown = tuple(slice(max(s.start - 2, 0), min(s.stop + 2, n)) for s, n in zip(box, suv.shape, strict=True))
    obj = instances[grown] == instance
    near = ndimage.binary_dilation(obj, LESION_CONNECTIVITY)
    shell = ndimage.binary_dilation(near, LESION_CONNECTIVITY) & ~near
    shell &= ~ndimage.binary_dilation((instances[grown] > 0) & ~obj, LESION_CONNECTIVITY)
    if not shell.any():
        return False
    local = suv[grown]
    return bool(np.mean(local[shell] >= UPTAKE_NEIGHBOUR_FRACTION * local[obj].max()) >= UPTAKE_NEIGHBOUR_SHARE)


def _hot_spots(volume: PETVolume, instances: np.ndarray) -> list[tuple[int, int, int]]:
    """Centres of the largest hot non-target components (largest first)."""
    non_target = ~ndimage.binary_dilation(instances > 0, LESION_CONNECTIVITY, iterations=HOT_SPOT_TARGET_MARGIN)
    values = volume.suv[non_target]
    if values.size == 0:
        return []
    threshold = float(np.percentile(values, HOT_SPOT_PERCENTILE))
    if threshold <= 0:
        return []
    components, count = ndimage.label((volume.suv >= threshold) & non_target, structure=LESION_CONNECTIVITY)
    sizes = np.bincount(components.ravel(), minlength=count + 1)
    minimum = max(2, int(np.ceil(HOT_SPOT_MIN_ML / volume.voxel_volume_ml)))
    order = [i for i in np.argsort(-sizes[1:], kind="stable") + 1 if sizes[i] >= minimum][:HOT_SPOTS_PER_CASE]
    boxes = ndimage.find_objects(components)
    spots = []
    for component in order:
        box = boxes[component - 1]
        centre = centre_click(components[box] == component, volume.spacing)
        spots.append(tuple(int(c + s.start) for c, s in zip(centre, box, strict=True)))
    return spots


def load_cases(
    records,
    label_names: dict[str, int] | None = None,
    split_classes: Collection[str] = DEFAULT_SPLIT_CLASSES,
) -> list[TrainingCase]:
    """Load every record once (volumes stay in memory: 4 mm whole-body scans are ~15 MB each)."""
    cases = [case for record in check_records(records) if (case := load_case(record, label_names, split_classes))]
    if not cases:
        raise TrainingDataError("every label is empty: there is no object to train on")
    return cases


# ----------------------------------------------------------------------------------------------
# Crops


@dataclass
class CropSample:
    """One model input and the object a simulated annotator is after."""

    image: torch.Tensor  # (1, S, S, S), normalised as the preset says
    target: torch.Tensor  # (S, S, S) bool; all False for a hot-spot crop
    click_hint: np.ndarray | None  # crop index the first click must be at (hot spots), else None
    case_id: str
    instance: int  # 0 for a hot-spot crop
    kind: str  # "object" or "hot_spot"
    # Other objects well inside the same crop, as (instance, target): more prompt sets for one encoder pass.
    neighbours: list[tuple[int, torch.Tensor]] = field(default_factory=list)


class CropSampler:
    """Draws training crops from loaded cases with its own seeded generator.

    Objects are drawn with weight ``voxels ** (1/3)`` (proportional to their diameter: small lesions are
    drawn often, as the per-lesion metric counts them, large ones somewhat more since they are harder),
    times ``low_tier_weight`` for low-quality labels and ``touching_weight`` for lesions that sit in uptake
    (where thresholds leak and the model is weakest). The crop is centred on the object's deepest voxel moved
    by up to ``position_jitter`` of the crop along each axis, so objects (and prompts) are not always
    central. A share ``hot_spot_share`` of crops centres on a hot non-target structure instead (see module
    docstring). ``intensity_scale``: SUV multiplied by exp(U(-s, s)), the spread of uptake between patients.
    ``neighbours``: up to this many other objects of the case whose centre lies in the crop, at least 1/8 of
    the crop from its faces, come with each crop (chosen at random), so one encoded crop trains several
    prompts, as SAM trains several masks per image.
    """

    def __init__(
        self,
        cases: list[TrainingCase],
        preset: Preset,
        rng: np.random.Generator,
        *,
        hot_spot_share: float = 0.1,
        position_jitter: float = 0.125,
        intensity_scale: float = 0.15,
        low_tier_weight: float = 1.0,
        touching_weight: float = 1.0,
        neighbours: int = 0,
    ):
        self.cases = cases
        self.neighbours = neighbours
        self.preset = preset
        self.rng = rng
        self.hot_spot_share = hot_spot_share
        self.position_jitter = position_jitter
        self.intensity_scale = intensity_scale
        self.objects = [(c, o) for c, case in enumerate(cases) for o in case.objects]
        self.touching_weight = float(touching_weight)
        self.set_low_tier_weight(low_tier_weight)
        self.hot_spots = [(c, spot) for c, case in enumerate(cases) for spot in case.hot_spots]
        self.drawn: Counter[str] = Counter()  # crops drawn per case id

    def set_low_tier_weight(self, low_tier_weight: float) -> None:
        """Sampling weight of low-tier objects relative to high-tier ones (CPCL's warm-up sets it to 0)."""
        tier_weight = {"high": 1.0, "low": float(low_tier_weight)}
        weights = np.array([tier_weight[self.cases[c].tier] * o.voxels ** (1 / 3)
                            * (self.touching_weight if o.in_uptake else 1.0) for c, o in self.objects])
        if not self.objects or weights.sum() <= 0:
            raise TrainingDataError("no object to sample: every case is empty or has low_tier_weight 0")
        self.weights = weights / weights.sum()

    def batch(self, size: int) -> list[CropSample]:
        return [self.sample() for _ in range(size)]

    def sample(self) -> CropSample:
        if self.hot_spots and self.rng.random() < self.hot_spot_share:
            return self.sample_hot_spot(int(self.rng.integers(len(self.hot_spots))))
        return self.sample_object(int(self.rng.choice(len(self.objects), p=self.weights)))

    def sample_hot_spot(self, index: int, rng: np.random.Generator | None = None) -> CropSample:
        """A crop around hot spot ``index`` of `hot_spots`, clicked there, with an empty target; drawn with
        ``rng`` (default: the sampler's)."""
        rng = rng or self.rng
        case_index, spot = self.hot_spots[index]
        case = self.cases[case_index]
        geometry = self._geometry(case, case.volume.index_to_world(spot), rng)
        target = torch.zeros((self.preset.crop_size,) * 3, dtype=torch.bool)
        hint = geometry.stored_to_crop(case.volume.affine, [spot])[0]
        return self._crop(case, geometry, target, hint, 0, "hot_spot", rng)

    def sample_object(self, index: int, rng: np.random.Generator | None = None) -> CropSample:
        """A crop around object ``index`` of `objects`, jittered as the class says."""
        rng = rng or self.rng
        case_index, obj = self.objects[index]
        case = self.cases[case_index]
        geometry = self._geometry(case, obj.centre_mm, rng)
        target = self._target(case, obj.instance, geometry)
        return self._crop(case, geometry, target, None, obj.instance, "object", rng)

    def _crop(self, case: TrainingCase, geometry: CropGeometry, target, hint, instance: int, kind: str,
              rng: np.random.Generator) -> CropSample:
        self.drawn[case.id] += 1
        suv = crop_volume(case.volume.suv, case.volume.affine, geometry)
        if self.intensity_scale:
            suv = suv * float(np.exp(rng.uniform(-self.intensity_scale, self.intensity_scale)))
        image = normalise(suv, self.preset.normalisation)[None]
        neighbours = [(o.instance, self._target(case, o.instance, geometry))
                      for o in self._neighbours(case, geometry, instance, rng)]
        return CropSample(image, target, hint, case.id, instance, kind, neighbours)

    def _neighbours(self, case: TrainingCase, geometry: CropGeometry, primary: int,
                    rng: np.random.Generator) -> list[TrainingObject]:
        if not self.neighbours:
            return []
        size = geometry.size
        margin = size / 8
        to_crop = np.linalg.inv(geometry.affine)
        inside = []
        for obj in case.objects:
            if obj.instance == primary:
                continue
            index = to_crop[:3, :3] @ obj.centre_mm + to_crop[:3, 3]
            if np.all((index >= margin) & (index <= size - 1 - margin)):
                inside.append(obj)
        if len(inside) > self.neighbours:
            chosen = rng.choice(len(inside), self.neighbours, replace=False)
            inside = [inside[i] for i in sorted(chosen)]
        return inside

    def _geometry(self, case: TrainingCase, centre_mm, rng: np.random.Generator) -> CropGeometry:
        size, spacing = self.preset.crop_size, self.preset.spacing_mm
        offset = rng.uniform(-1, 1, 3) * self.position_jitter * size * spacing
        return CropGeometry.around(case.volume.affine, np.asarray(centre_mm) + offset, spacing, size)

    @staticmethod
    def _target(case: TrainingCase, instance: int, geometry: CropGeometry) -> torch.Tensor:
        """The object's mask on the crop grid: its resampled fraction >= 0.5.

        Only the block under the crop is compared and resampled. An object too thin to keep a voxel at 0.5
        keeps its highest-fraction voxels instead, so a sampled object is never an empty target.
        """
        affine, shape = case.volume.affine, case.volume.shape
        box = geometry.covered_box(affine, shape)
        box = tuple(slice(max(s.start - 1, 0), min(s.stop + 1, n)) for s, n in zip(box, shape, strict=True))
        block = (case.instances[box] == instance).astype(np.float32)
        fraction = crop_volume(block, affine @ translation([s.start for s in box]), geometry)
        target = fraction >= 0.5
        if not target.any() and fraction.max() > 0:
            target = fraction == fraction.max()
        return target
