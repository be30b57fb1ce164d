"""The label audit report: the stored labels the models dispute most, for a curator to re-check first.

`write_audit` reads the scores `scoring.score_datastore` left in a datastore's image info and writes to one
folder ``suspicious_labels.csv``, every image with a ``final`` label, the most suspicious first (those without
a score after them, with the reason, so none silently drops out of the audit), and ``index.html``: counts,
then for the top N a figure to judge a label without opening a viewer: coronal and sagittal maximum-intensity
projections and the axial slice through the most disputed target, with the stored label and the models'
consensus outlined. The consensus is not stored with the scores (a whole-body mask per scan), so it is
recomputed for the top N only.

Frames: voxel indices of the stored image (the CSV's and the page's voxels). Figures are drawn head up in the
radiological convention (the patient's right on the viewer's left, anterior on the left of the sagittal view),
whatever the stored axis order.
"""

from __future__ import annotations

import csv
import datetime
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from segany_pet.active.cross_prompt import MAX_HOT_SPOTS, score_scan
from segany_pet.active.scoring import FINAL, file_stamp
from segany_pet.errors import UserInputError
from segany_pet.pet import load_nifti
from segany_pet.predictor import Predictor
from segany_pet.report import (
    PAGE_STYLE,
    cell_text,
    draw_figure,
    html_escape,
    html_fields,
    html_table,
    pyplot_agg,
    voxel_text,
)

log = logging.getLogger(__name__)

CSV_NAME = "suspicious_labels.csv"
HTML_NAME = "index.html"
FIGURE_FOLDER = "img"
RUN_SCORING = "run scoring first: POST /scoring/cross_prompt or segany-pet score"
CSV_COLUMNS = ("rank", "image_id", "label_noise_score", "cross_prompt_disagreement", "tier", "worst_voxel_ijk",
               "worst_kind", "worst_noise_score", "label_components", "hot_spots", "image_path", "label_path",
               "scored_at", "status", "note")
SCORED, NOT_SCORED, FAILED = "scored", "not scored", "error"
STALE_NOTE = "image or label changed since scoring: score again"


@dataclass
class AuditEntry:
    """One labeled image as the report lists it: its paths, label tier, stored scores and status."""

    image_id: str
    image_path: str
    label_path: str
    tier: str
    info: dict
    status: str
    note: str = ""

    @property
    def noise_score(self) -> float | None:
        return self.info.get("label_noise_score") if self.status == SCORED else None

    @property
    def worst(self) -> dict:
        """The target whose voxels the models most agree against the label ({} without one)."""
        if self.status != SCORED or not self.info.get("label_noise_worst"):
            return {}
        return self.info["label_noise_worst"][0]


def audit_entries(datastore) -> list[AuditEntry]:
    """Every image with a final label: the scored ones by label-noise score (then disagreement), highest first,
    then those without a score, by image id. Raises UserInputError when there is nothing to audit yet."""
    images = sorted(datastore.list_images())
    if not images:
        raise UserInputError("the datastore holds no images: add PET images and their final labels, score them "
                             f"({RUN_SCORING}), then write the audit")
    entries = [_entry(datastore, image_id) for image_id in images if datastore.get_label_by_image_id(image_id, FINAL)]
    if not entries:
        raise UserInputError(f"none of the {len(images)} images has a '{FINAL}' label: the audit checks stored "
                             "labels; save labels first")
    if all(entry.status == NOT_SCORED for entry in entries):
        raise UserInputError(f"none of the {len(entries)} labeled images has been scored: {RUN_SCORING}")
    scored = sorted((e for e in entries if e.status == SCORED),
                    key=lambda e: (-e.noise_score, -(e.info.get("cross_prompt_disagreement") or 0.0), e.image_id))
    return scored + [e for e in entries if e.status != SCORED]


def _entry(datastore, image_id: str) -> AuditEntry:
    label_id = datastore.get_label_by_image_id(image_id, FINAL)
    image_path = datastore.get_image_uri(image_id)
    label_path = datastore.get_label_uri(label_id, FINAL)
    tier = (datastore.get_label_info(label_id, FINAL) or {}).get("quality", "high")
    info = datastore.get_image_info(image_id) or {}
    entry = AuditEntry(image_id, image_path, label_path, tier, info, SCORED)
    if info.get("cross_prompt_error"):
        entry.status, entry.note = FAILED, f"scoring failed: {info['cross_prompt_error']}"
    elif info.get("label_noise_score") is None:
        entry.status = NOT_SCORED
        entry.note = ("scored before its label was saved: score again" if info.get("cross_prompt_key")
                      else f"not scored yet: {RUN_SCORING}")
    elif _changed_since_scoring(info, image_path, label_path):
        entry.note = STALE_NOTE
    return entry


def _changed_since_scoring(info: dict, image_path: str, label_path: str) -> bool:
    """Whether the image or label file differs from the one scored (the stamps `score_datastore` keyed on)."""
    try:
        current = f"{file_stamp(image_path)}|{file_stamp(label_path)}|"
    except OSError:
        return True
    return not str(info.get("cross_prompt_key", "")).startswith(current)


# ----------------------------------------------------------------------------------------------
# The report


def write_audit(datastore, out_dir, point: Predictor | None = None, box: Predictor | None = None, *,
                top: int = 20, max_hot_spots: int = MAX_HOT_SPOTS,
                on_progress: Callable[[dict], None] | None = None) -> dict[str, Path]:
    """Write ``suspicious_labels.csv``, ``index.html`` and the top ``top`` figures (``img/``) to ``out_dir``.

    ``point`` and ``box``: the models whose consensus the figures outline (either may stand for both; as
    scored, for the outline to show what the scores measured); without them the figures show the stored
    label only. ``max_hot_spots``: as scored. ``on_progress`` receives ``{"done", "total", "image_id"}`` after
    each figure (each re-runs both models on every target of its scan). Returns the paths written (``csv``,
    ``html``, ``figures``: the folder).
    """
    if top < 0:
        raise UserInputError(f"top must be 0 or more, got {top}")
    entries = audit_entries(datastore)
    out = Path(out_dir)
    figures = out / FIGURE_FOLDER
    figures.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / CSV_NAME, "html": out / HTML_NAME, "figures": figures}
    write_csv(entries, paths["csv"])
    point = point if point is not None else box
    box = box if box is not None else point
    pyplot = pyplot_agg()
    chosen = [entry for entry in entries if entry.status == SCORED][:top]
    shown = []
    for done, entry in enumerate(chosen, start=1):
        name = f"{done:03d}_{re.sub(r'[^A-Za-z0-9._-]+', '_', entry.image_id)[:80]}.png"
        try:
            note = draw_entry(pyplot, entry, figures / name, point, box, max_hot_spots)
            shown.append((entry, f"{FIGURE_FOLDER}/{name}", note))
        except (UserInputError, OSError) as exc:  # a file replaced or removed since scoring
            shown.append((entry, None, f"no figure: {exc}"))
            log.warning("audit: no figure for %s: %s", entry.image_id, exc)
        log.info("audit: figure %d/%d (%s)", done, len(chosen), entry.image_id)
        if on_progress is not None:
            on_progress({"done": done, "total": len(chosen), "image_id": entry.image_id})
    page_notes = []
    if point is None:
        page_notes.append("No model was given: the figures outline the stored label only, not the models' "
                          "consensus.")
    paths["html"].write_text(html_page(entries, shown, page_notes, len(datastore.list_images())), encoding="utf-8")
    return paths


def write_csv(entries: list[AuditEntry], path: Path) -> None:
    """One row per labeled image in the order of ``entries`` (rank 1 the most suspicious label)."""
    with open(path, "w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(CSV_COLUMNS)
        for rank, entry in enumerate(entries, start=1):
            writer.writerow([cell_text(value) for value in _row(rank, entry)])


def _row(rank: int, entry: AuditEntry) -> tuple:
    scored = entry.status == SCORED
    info, worst = entry.info, entry.worst
    targets = (info.get("targets") or {}) if scored else {}
    return (rank, entry.image_id, entry.noise_score, info.get("cross_prompt_disagreement") if scored else None,
            entry.tier, voxel_text(worst.get("voxel")), worst.get("kind"), worst.get("noise_score"),
            targets.get("label"), targets.get("hot_spot"), entry.image_path, entry.label_path,
            _iso_time(info.get("cross_prompt_ts")), entry.status, entry.note)


def _iso_time(timestamp) -> str | None:
    if timestamp is None:
        return None
    return datetime.datetime.fromtimestamp(timestamp).astimezone().isoformat(timespec="seconds")


# ----------------------------------------------------------------------------------------------
# Figures


def draw_entry(pyplot, entry: AuditEntry, path: Path, point: Predictor | None, box: Predictor | None,
               max_hot_spots: int) -> str:
    """Draw one scored entry's figure to ``path``; returns a note for the page ("" when all is drawn)."""
    volume = load_nifti(entry.image_path)
    label = _load_label(entry.label_path, volume.shape, entry.image_id) > 0
    consensus = None
    if point is not None:
        consensus = np.zeros(volume.shape, dtype=bool)
        try:
            sessions = (point.set_volume(volume, f"audit:{entry.image_id}"),
                        box.set_volume(volume, f"audit:{entry.image_id}"))
            score_scan(*sessions, label=label, liver=entry.info.get("liver_reference"), max_hot_spots=max_hot_spots,
                       consensus=consensus)
        finally:
            point.clear_cache()
            box.clear_cache()
    voxel = entry.worst.get("voxel")
    note = "" if voxel else "no target was scored: the axial slice is through the hottest voxel"
    title = (f"{entry.image_id}: label noise {entry.noise_score:.3f}, "
             f"disagreement {entry.info.get('cross_prompt_disagreement') or 0.0:.3f}")
    draw_figure(pyplot, volume, label, consensus, voxel, path, title)
    return note


def _load_label(path: str, shape, image_id: str) -> np.ndarray:
    try:
        label = np.asarray(nib.load(path).dataobj)
    except Exception as exc:  # nibabel raises many types for damaged files
        raise UserInputError(f"label of {image_id} cannot be read ({exc}); save it again") from exc
    if label.shape != shape:
        raise UserInputError(f"label of {image_id} has shape {label.shape}, its image {shape}: score again")
    return label


# ----------------------------------------------------------------------------------------------
# The page


def html_page(entries: list[AuditEntry], shown: list[tuple[AuditEntry, str | None, str]], page_notes: list[str],
              images: int) -> str:
    """The report page: counts; the ``shown`` entries (entry, its figure's path relative to the page or None,
    a note) with their scores; the labels without scores."""
    counts = {"images": images, "labeled": len(entries)}
    for status, heading in ((SCORED, "scored"), (NOT_SCORED, "not scored"), (FAILED, "scoring failed")):
        counts[heading] = sum(entry.status == status for entry in entries)
    ranks = {entry.image_id: rank for rank, entry in enumerate(entries, start=1)}
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8"><title>Label audit</title>',
        f"<style>{PAGE_STYLE}</style></head><body>",
        "<h1>Label audit</h1>",
        f"<p>Written {html_escape(_iso_time(datetime.datetime.now().timestamp()))}. Every labeled image, ranked: "
        f'<a href="{CSV_NAME}">{CSV_NAME}</a>.</p>',
        html_table(list(counts), [list(counts.values())]),
        "<p>Label noise score: of the voxels the label or the models' consensus calls lesion, the share where the "
        "point- and box-prompted models agree with each other against the label (0 = no dispute). "
        "Disagreement: 1 - Dice between the two models on the scan's most disputed targets.</p>",
        *(f'<p class="note">{html_escape(note)}</p>' for note in page_notes),
    ]
    if shown:
        parts.append(f"<h2>The {len(shown)} most suspicious labels</h2>" if len(shown) > 1
                     else "<h2>The most suspicious label</h2>")
    for entry, figure, note in shown:
        parts.append(_entry_section(ranks[entry.image_id], entry, figure, note))
    unscored = [entry for entry in entries if entry.status != SCORED]
    if unscored:
        parts.append(f"<h2>Labeled images without a score ({len(unscored)})</h2>")
        parts.append(html_table(["rank", "image", "status", "reason"],
                            [[ranks[e.image_id], e.image_id, e.status, e.note] for e in unscored]))
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _entry_section(rank: int, entry: AuditEntry, figure: str | None, note: str) -> str:
    worst, targets = entry.worst, entry.info.get("targets") or {}
    worst_text = (f"voxel [{voxel_text(worst['voxel'])}] ({worst.get('kind')}), noise score "
                  f"{worst.get('noise_score')}" if worst else "none")
    rows = [
        ["label noise score", entry.noise_score],
        ["cross-prompt disagreement", entry.info.get("cross_prompt_disagreement")],
        ["label tier", entry.tier],
        ["worst target", worst_text],
        ["targets", f"{targets.get('label', 0)} label components, {targets.get('hot_spot', 0)} hot spots"],
        ["scored", _iso_time(entry.info.get("cross_prompt_ts"))],
        ["image", entry.image_path],
        ["label", entry.label_path],
    ]
    parts = [f'<section id="rank-{rank}"><h3>{rank}. {html_escape(entry.image_id)}</h3>', html_fields(rows)]
    parts += [f'<p class="note">{html_escape(text)}</p>' for text in (entry.note, note) if text]
    if figure is not None:
        alt = html_escape(f"MIPs and axial slice of {entry.image_id}")
        parts.append(f'<img src="{html_escape(figure)}" alt="{alt}">')
    parts.append("</section>")
    return "\n".join(parts)
