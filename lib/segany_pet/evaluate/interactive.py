"""The interactive benchmark: a simulated annotator clicks, the model (through the real `Predictor`) answers.

Three protocols, all on one case at a time, all with clicks in stored voxel indices:

- `evaluate_case`, per lesion: the first click at the lesion's centre (`centre_click`, as autoPET IV), each
  further click at the deepest voxel of the largest error of the current mask near that lesion (missed lesion
  -> positive click, leak -> negative click: `corrective_click`). Dice after every click (`lesion_dice`),
  then FPV/FNV and Dice of the union of the final masks for the case.
- `evaluate_baselines`: the classical seeded thresholds from the same centre click, on the same lesions.
- `evaluate_autopet_iv`: the autoPET IV protocol (shared/reference/pet.md section 4): 11 steps, each adding a
  lesion click and a background click; whole-volume Dice, FPV, FNV per step and their trapezoid AUC.

`segany_pet.evaluate.report` turns results into a Markdown table, a JSON file and a plot of Dice over clicks,
with lesions split into those touching a hot organ and isolated ones.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection, Mapping

import numpy as np
from scipy import ndimage

from segany_pet.evaluate.metrics import dice, false_negative_volume, false_positive_volume, lesion_dice
from segany_pet.pet.quantify import LESION_CONNECTIVITY, label_lesions
from segany_pet.phantom.lesions import HOT_NEIGHBOURS
from segany_pet.prompts import centre_click
from segany_pet.segment.threshold import METHODS, segment_from_clicks

log = logging.getLogger(__name__)

REPORT_CLICKS = (1, 3, 5)
LESION_MARGIN = 5  # voxels around a lesion's box where its Dice is judged and its corrective clicks are found
AUTOPET_STEPS = 11
AUTOPET_PERCENTILE = 99.75
# Hot voxels this close to a lesion (voxels) are its blurred rim, not physiological uptake to click away.
AUTOPET_LESION_MARGIN = 2


# ----------------------------------------------------------------------------------------------
# Clicks


def corrective_click(
    prediction: np.ndarray, truth: np.ndarray, *, taken=(), ignore: np.ndarray | None = None, spacing=(1.0, 1.0, 1.0)
) -> tuple[tuple[int, int, int], bool] | None:
    """The next click of a simulated annotator: the deepest voxel of the largest error component.

    Missed object voxels (false negatives) give a positive click (True), leaked ones (false positives) a
    negative click (False); components are 26-connected and the larger wins (a tie goes to the missed part).
    ``ignore`` voxels are neither, ``taken`` voxels are never clicked twice. None when nothing is wrong.
    """
    pred, truth = np.asarray(prediction) != 0, np.asarray(truth) != 0
    errors = [truth & ~pred, pred & ~truth]
    for error in errors:
        if ignore is not None:
            error &= ~ignore
        for voxel in taken:
            error[tuple(voxel)] = False
    best = None
    for error, positive in zip(errors, (True, False), strict=True):
        labels, count = ndimage.label(error, structure=LESION_CONNECTIVITY)
        if count == 0:
            continue
        sizes = np.bincount(labels.ravel())[1:]
        largest = int(np.argmax(sizes))
        if best is None or sizes[largest] > best[0]:
            best = (sizes[largest], labels == largest + 1, positive)
    if best is None:
        return None
    return tuple(int(v) for v in centre_click(best[1], spacing)), best[2]


def touches_from_organs(
    truth_instances: np.ndarray, organs: np.ndarray, organ_names: Mapping[int, str], hot=HOT_NEIGHBOURS
) -> dict[int, str | None]:
    """Per lesion id: the hot organ (name in ``hot``) its 26-neighbourhood borders most, or None."""
    hot_labels = [int(k) for k, name in organ_names.items() if name in hot]
    touches = {}
    for lesion_id, box in enumerate(ndimage.find_objects(np.asarray(truth_instances)), start=1):
        if box is None:
            continue
        box = _grown(box, 1, truth_instances.shape)
        lesion = truth_instances[box] == lesion_id
        shell = ndimage.binary_dilation(lesion, LESION_CONNECTIVITY) & ~lesion
        neighbours = organs[box][shell]
        neighbours = neighbours[np.isin(neighbours, hot_labels)]
        touches[lesion_id] = organ_names[int(np.bincount(neighbours).argmax())] if neighbours.size else None
    return touches


def _group(lesion_id: int, touches: Mapping | None) -> tuple[str, str | None]:
    if touches is None or lesion_id not in touches:
        return "unknown", None
    organ = touches[lesion_id]
    return ("touching" if organ else "isolated"), organ


def _grown(box, margin: int, shape) -> tuple[slice, ...]:
    return tuple(slice(max(s.start - margin, 0), min(s.stop + margin, n)) for s, n in zip(box, shape, strict=True))


def _lesion_ids(truth_instances: np.ndarray, lesion_ids) -> list[int]:
    present = [int(v) for v in np.unique(truth_instances) if v != 0]
    if lesion_ids is None:
        return present
    missing = sorted(set(lesion_ids) - set(present))
    if missing:
        raise ValueError(f"lesion ids {missing} do not occur in the ground truth")
    return [int(v) for v in lesion_ids]


def _centre_clicks(truth_instances, ids, spacing) -> dict[int, tuple[int, int, int]]:
    boxes = ndimage.find_objects(truth_instances)
    clicks = {}
    for lesion_id in ids:
        box = boxes[lesion_id - 1]
        local = centre_click(truth_instances[box] == lesion_id, spacing)
        clicks[lesion_id] = tuple(int(c + s.start) for c, s in zip(local, box, strict=True))
    return clicks


# ----------------------------------------------------------------------------------------------
# Per-lesion protocol


def evaluate_case(
    predictor,
    volume,
    truth_instances: np.ndarray,
    clicks: int = 5,
    *,
    touches: Mapping[int, str | None] | None = None,
    volume_id: str | None = None,
    lesion_ids: Collection[int] | None = None,
    margin: int = LESION_MARGIN,
    edge: str | None = None,
) -> dict:
    """The per-lesion click protocol on one case through ``predictor`` (a `Predictor`), with masks snapped to
    the uptake by ``edge`` (`VolumeSession.predict`) or the model's own.

    ``truth_instances``: lesion ids on the volume's grid (0 background); ``touches``: lesion id -> hot organ
    it borders or None (the phantom's ``touches``, or `touches_from_organs`), giving each lesion the group
    "touching" / "isolated" ("unknown" without it). ``lesion_ids`` restricts the lesions clicked.

    Returns ``{"case", "clicks", "lesions": [row per lesion], "dice", "fpv_ml", "fnv_ml", "seconds"}``; a row
    holds ``dice`` after each click (a lesion with nothing left to correct keeps its Dice), the clicks
    ``[i, j, k, 1 | 0]``, the model's IoU estimates, the group and the lesion volume. FPV counts predicted
    components touching no lesion at all; FNV and the case Dice count the clicked lesions only.
    """
    started = time.perf_counter()
    truth_instances = np.asarray(truth_instances).astype(np.int32, copy=False)
    if truth_instances.shape != volume.shape:
        raise ValueError(f"truth of shape {truth_instances.shape} is not on the volume's grid {volume.shape}")
    if clicks < 1:
        raise ValueError(f"clicks must be at least 1, got {clicks}")
    session = predictor.set_volume(volume, volume_id)
    spacing = volume.spacing
    ids = _lesion_ids(truth_instances, lesion_ids)
    boxes = ndimage.find_objects(truth_instances)
    first_clicks = _centre_clicks(truth_instances, ids, spacing)
    union = np.zeros(volume.shape, dtype=bool)
    rows = []
    for lesion_id in ids:
        lesion_started = time.perf_counter()
        box = _grown(boxes[lesion_id - 1], margin, volume.shape)
        offset = np.array([s.start for s in box])
        lesion = truth_instances[box] == lesion_id
        others = (truth_instances[box] != 0) & ~lesion
        click = first_clicks[lesion_id]
        prediction = session.predict(foreground=[click], edge=edge)
        dices = [lesion_dice(prediction.mask, truth_instances, lesion_id, margin)]
        ious, clicked = [prediction.iou], [[*click, 1]]
        taken = [tuple(np.subtract(click, offset))]
        while len(dices) < clicks:
            correction = corrective_click(prediction.mask[box], lesion, taken=taken, ignore=others, spacing=spacing)
            if correction is None:  # nothing left to correct near this lesion
                dices.append(dices[-1])
                continue
            local, positive = correction
            taken.append(local)
            voxel = [int(v) for v in np.add(local, offset)]
            prediction = session.predict(
                foreground=[voxel] if positive else (), background=() if positive else [voxel], previous=prediction,
                edge=edge,
            )
            dices.append(lesion_dice(prediction.mask, truth_instances, lesion_id, margin))
            ious.append(prediction.iou)
            clicked.append([*voxel, int(positive)])
        union |= prediction.mask != 0
        group, organ = _group(lesion_id, touches)
        rows.append(
            {
                "lesion": lesion_id,
                "volume_ml": round(float(lesion.sum() * volume.voxel_volume_ml), 4),
                "group": group,
                "touches": organ,
                "dice": [round(float(d), 5) for d in dices],
                "iou_estimate": [round(float(i), 4) for i in ious],
                "clicks": clicked,
                "seconds": round(time.perf_counter() - lesion_started, 3),
            }
        )
    clicked_truth = np.isin(truth_instances, ids)
    voxel_ml = volume.voxel_volume_ml
    return {
        "case": volume_id,
        "clicks": clicks,
        "lesions": rows,
        "dice": dice(union, clicked_truth),
        "fpv_ml": false_positive_volume(union, truth_instances != 0, voxel_ml),
        "fnv_ml": false_negative_volume(union, clicked_truth, voxel_ml),
        "seconds": round(time.perf_counter() - started, 3),
    }


def evaluate_baselines(
    volume,
    truth_instances: np.ndarray,
    *,
    methods: Collection[str] | None = None,
    touches: Mapping[int, str | None] | None = None,
    case_id: str | None = None,
    lesion_ids: Collection[int] | None = None,
    margin: int = LESION_MARGIN,
) -> list[dict]:
    """The classical methods (`METHODS`) from each lesion's centre click: one row per lesion per method.

    A row: case, lesion, method, group, touches, volume_ml, dice (`lesion_dice`, as the model's), and the
    case's FPV/FNV of that method's union over the clicked lesions (``case_fpv_ml``, ``case_fnv_ml``).
    """
    truth_instances = np.asarray(truth_instances).astype(np.int32, copy=False)
    ids = _lesion_ids(truth_instances, lesion_ids)
    spacing = volume.spacing
    clicks = _centre_clicks(truth_instances, ids, spacing)
    clicked_truth = np.isin(truth_instances, ids)
    rows = []
    for method in methods or METHODS:
        union = np.zeros(volume.shape, dtype=bool)
        method_rows = []
        for lesion_id in ids:
            mask = segment_from_clicks(volume.suv, spacing, [clicks[lesion_id]], method=method)
            union |= mask != 0
            group, organ = _group(lesion_id, touches)
            method_rows.append(
                {
                    "case": case_id,
                    "lesion": lesion_id,
                    "method": method,
                    "group": group,
                    "touches": organ,
                    "volume_ml": round(float((truth_instances == lesion_id).sum() * volume.voxel_volume_ml), 4),
                    "dice": round(float(lesion_dice(mask, truth_instances, lesion_id, margin)), 5),
                }
            )
        fpv = false_positive_volume(union, truth_instances != 0, volume.voxel_volume_ml)
        fnv = false_negative_volume(union, clicked_truth, volume.voxel_volume_ml)
        rows += [{**row, "case_fpv_ml": fpv, "case_fnv_ml": fnv} for row in method_rows]
    return rows


# ----------------------------------------------------------------------------------------------
# autoPET IV


def autopet_iv_clicks(
    suv: np.ndarray, truth: np.ndarray, spacing, *, n: int = AUTOPET_STEPS - 1, seed: int = 0,
    percentile: float = AUTOPET_PERCENTILE,
) -> tuple[list[tuple[tuple[int, int, int], int]], list[tuple[int, int, int]]]:
    """The protocol's clicks: ``n`` lesion clicks as (voxel, component id) and up to ``n`` background clicks.

    Lesion clicks: up to ``n`` 26-connected components at random without replacement, each at its centre;
    with fewer components, the rest go round the chosen ones at random voxels of their boundary (never a voxel
    twice). Background clicks: centres of the 26-connected components of the non-lesion voxels at or above the
    ``percentile`` of the non-lesion SUV, largest first (hot voxels within AUTOPET_LESION_MARGIN voxels of a
    lesion are its blurred rim and left out).
    """
    rng = np.random.default_rng(seed)
    components, count = label_lesions(truth)
    lesion_clicks = []
    if count:
        chosen = [int(c) for c in rng.choice(np.arange(1, count + 1), size=min(n, count), replace=False)]
        boxes = ndimage.find_objects(components)
        taken = set()
        for component in chosen:
            voxel = tuple(_centre_clicks(components, [component], spacing)[component])
            lesion_clicks.append((voxel, component))
            taken.add(voxel)
        exhausted = set()
        turn = 0
        while len(lesion_clicks) < n and len(exhausted) < len(chosen):
            component = chosen[turn % len(chosen)]
            turn += 1
            if component in exhausted:
                continue
            box = boxes[component - 1]
            inside = components[box] == component
            rim = inside & ~ndimage.binary_erosion(inside)
            candidates = [
                tuple(int(v + s.start) for v, s in zip(voxel, box, strict=True))
                for voxel in np.argwhere(rim if rim.any() else inside)
            ]
            candidates = [c for c in candidates if c not in taken]
            if not candidates:
                exhausted.add(component)
                continue
            voxel = candidates[int(rng.integers(len(candidates)))]
            lesion_clicks.append((voxel, component))
            taken.add(voxel)
    non_lesion = ~ndimage.binary_dilation(truth != 0, LESION_CONNECTIVITY, iterations=AUTOPET_LESION_MARGIN)
    background = []
    if non_lesion.any():
        threshold = float(np.percentile(suv[truth == 0], percentile))
        hot, hot_count = label_lesions((suv >= threshold) & non_lesion)
        boxes = ndimage.find_objects(hot)
        for component in range(1, min(hot_count, n) + 1):  # label_lesions numbers largest first
            box = boxes[component - 1]
            local = centre_click(hot[box] == component, spacing)
            background.append(tuple(int(v + s.start) for v, s in zip(local, box, strict=True)))
    return lesion_clicks, background


def _trapezoid(values) -> float:
    return float(np.trapezoid(values)) if hasattr(np, "trapezoid") else float(np.trapz(values))


def evaluate_autopet_iv(
    predictor, volume, truth: np.ndarray, *, steps: int = AUTOPET_STEPS, seed: int = 0, volume_id: str | None = None,
    edge: str | None = None,
) -> dict:
    """The autoPET IV interactive protocol on one case (clicks from `autopet_iv_clicks`).

    Step 0 has no click: a promptable model answers nothing, so its mask is empty. Step s gives the model the
    first s lesion and s background clicks; the lesion clicks on one component form one prompt (refining that
    component's previous prediction), background clicks count in the crops they fall in, and the answers'
    union is scored against the whole ground truth (``edge``: as `VolumeSession.predict`). Returns per-step
    ``dice``, ``fpv_ml``, ``fnv_ml``, their ``auc_*`` (trapezoid rule over step index, so a Dice AUC lies in
    [0, steps - 1]) and the clicks.
    """
    started = time.perf_counter()
    truth = np.asarray(truth) != 0
    lesion_clicks, background = autopet_iv_clicks(volume.suv, truth, volume.spacing, n=steps - 1, seed=seed)
    session = predictor.set_volume(volume, volume_id)
    voxel_ml = volume.voxel_volume_ml
    previous: dict[int, object] = {}
    scores = {"dice": [], "fpv_ml": [], "fnv_ml": []}
    for step in range(steps):
        mask = np.zeros(volume.shape, dtype=bool)
        given = lesion_clicks[:step]
        for component in dict.fromkeys(c for _, c in given):
            foreground = [list(v) for v, c in given if c == component]
            prediction = session.predict(
                foreground=foreground, background=[list(v) for v in background[:step]],
                previous=previous.get(component), edge=edge,
            )
            previous[component] = prediction
            mask |= prediction.mask != 0
        scores["dice"].append(dice(mask, truth))
        scores["fpv_ml"].append(false_positive_volume(mask, truth, voxel_ml))
        scores["fnv_ml"].append(false_negative_volume(mask, truth, voxel_ml))
    return {
        "case": volume_id,
        **scores,
        **{f"auc_{name}": _trapezoid(values) for name, values in scores.items()},
        "lesion_clicks": [list(v) for v, _ in lesion_clicks],
        "background_clicks": [list(v) for v in background],
        "seconds": round(time.perf_counter() - started, 3),
    }
