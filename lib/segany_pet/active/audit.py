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
import html
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from segany_pet.active.cross_prompt import BODY_SUV, MAX_HOT_SPOTS, score_scan, superior_axis
from segany_pet.active.scoring import FINAL, file_stamp
from segany_pet.errors import UserInputError
from segany_pet.pet import PETVolume, load_nifti
from segany_pet.predictor import Predictor

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
# The SUV window's top: this percentile of the body's voxels, so a bladder or brain does not wash lesions out.
WINDOW_PERCENTILE = 99.5
LABEL_COLOUR, CONSENSUS_COLOUR, MARKER_COLOUR = "tab:blue", "tab:orange", "tab:green"


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
            writer.writerow([_cell(value) for value in _row(rank, entry)])


def _row(rank: int, entry: AuditEntry) -> tuple:
    scored = entry.status == SCORED
    info, worst = entry.info, entry.worst
    targets = (info.get("targets") or {}) if scored else {}
    return (rank, entry.image_id, entry.noise_score, info.get("cross_prompt_disagreement") if scored else None,
            entry.tier, _voxel_text(worst.get("voxel")), worst.get("kind"), worst.get("noise_score"),
            targets.get("label"), targets.get("hot_spot"), entry.image_path, entry.label_path,
            _iso_time(info.get("cross_prompt_ts")), entry.status, entry.note)


def _cell(value) -> str:
    return "" if value is None else str(value)


def _voxel_text(voxel) -> str | None:
    return " ".join(str(int(v)) for v in voxel) if voxel else None


def _iso_time(timestamp) -> str | None:
    if timestamp is None:
        return None
    return datetime.datetime.fromtimestamp(timestamp).astimezone().isoformat(timespec="seconds")


# ----------------------------------------------------------------------------------------------
# Figures


def ras_axes(affine: np.ndarray) -> tuple[tuple[int, int, int], tuple[bool, bool, bool]]:
    """The stored axes closest to the patient's right, front and head (RAS+), and for each whether its index
    runs the other way (towards the left, back, feet)."""
    head, towards_head = superior_axis(affine)
    others = [a for a in range(3) if a != head]
    right = max(others, key=lambda a: abs(affine[0, a]))
    front = others[0] if others[1] == right else others[1]
    return (right, front, head), (affine[0, right] < 0, affine[1, front] < 0, towards_head < 0)


def to_ras(array: np.ndarray, axes, reversed_axes) -> np.ndarray:
    """A view of a stored array with its axes in RAS+ order: indices growing to the patient's right, front and
    head."""
    ras = np.transpose(array, axes)
    return ras[tuple(slice(None, None, -1) if flip else slice(None) for flip in reversed_axes)]


def _ras_voxel(voxel, shape, axes, reversed_axes) -> list[int]:
    return [shape[a] - 1 - voxel[a] if flip else voxel[a] for a, flip in zip(axes, reversed_axes, strict=True)]


# Each view of a RAS+ array (x right, y front, z head): its 2D image with rows bottom-up (matplotlib's
# origin="lower": head and front up), a RAS voxel's (column, row) on it, and which RAS axes span it (columns,
# rows) for the aspect ratio. Columns run from the patient's right to left (radiological convention) and,
# sagittal, from front to back.
VIEWS = {
    "coronal MIP": (lambda ras, xyz: ras.max(axis=1).T[:, ::-1], lambda xyz, n: (n[0] - 1 - xyz[0], xyz[2]), (0, 2)),
    "sagittal MIP": (lambda ras, xyz: ras.max(axis=0).T[:, ::-1], lambda xyz, n: (n[1] - 1 - xyz[1], xyz[2]), (1, 2)),
    "axial slice": (lambda ras, xyz: ras[:, :, xyz[2]].T[:, ::-1], lambda xyz, n: (n[0] - 1 - xyz[0], xyz[1]), (0, 1)),
}


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


def draw_figure(pyplot, volume: PETVolume, label: np.ndarray, consensus: np.ndarray | None, voxel, path: Path,
                title: str) -> Path:
    """Coronal and sagittal MIPs of the SUV and the axial slice through ``voxel`` (stored indices; the hottest
    voxel when None), head up, the patient's right on the left, SUV 0 (white) to the body's WINDOW_PERCENTILE
    (black); ``label`` outlined in LABEL_COLOUR, ``consensus`` (when given) in CONSENSUS_COLOUR, ``voxel`` marked
    on every view."""
    axes, reversed_axes = ras_axes(volume.affine)
    suv, masks = to_ras(volume.suv, axes, reversed_axes), [to_ras(label, axes, reversed_axes)]
    if consensus is not None:
        masks.append(to_ras(consensus, axes, reversed_axes))
    spacing = [volume.spacing[a] for a in axes]
    at = voxel if voxel else [int(i) for i in np.unravel_index(np.argmax(volume.suv), volume.shape)]
    xyz = _ras_voxel(at, volume.shape, axes, reversed_axes)
    body = volume.suv[volume.suv > BODY_SUV]
    window_top = max(float(np.percentile(body, WINDOW_PERCENTILE)) if body.size else float(volume.suv.max()), 1e-3)

    widths = [suv.shape[c] * spacing[c] / (suv.shape[r] * spacing[r]) for *_, (c, r) in VIEWS.values()]
    figure, panels = pyplot.subplots(1, len(VIEWS), figsize=(11, 5.2), gridspec_kw={"width_ratios": widths})
    try:
        for panel, (view, (image_of, place, (column_axis, row_axis))) in zip(panels, VIEWS.items(), strict=True):
            panel.imshow(image_of(suv, xyz), cmap="gray_r", vmin=0.0, vmax=window_top, origin="lower",
                         aspect=spacing[row_axis] / spacing[column_axis], interpolation="nearest")
            for mask, colour in zip(masks, (LABEL_COLOUR, CONSENSUS_COLOUR), strict=False):
                plane = image_of(mask, xyz)
                if plane.any() and not plane.all():  # contour needs both sides of the level
                    panel.contour(plane.astype(np.float32), levels=[0.5], colors=colour, linewidths=0.9)
            if voxel:
                column, row = place(xyz, suv.shape)
                panel.plot([column], [row], marker="+", markersize=14, markeredgewidth=1.5, color=MARKER_COLOUR)
            panel.set_title(f"{view} through [{_voxel_text(at)}]" if view == "axial slice" else view, fontsize=9)
            panel.set_xticks([])
            panel.set_yticks([])
        handles = [pyplot.Line2D([], [], color=LABEL_COLOUR, label="stored label")]
        if consensus is not None:
            handles.append(pyplot.Line2D([], [], color=CONSENSUS_COLOUR, label="models' consensus"))
        if voxel:
            handles.append(pyplot.Line2D([], [], color=MARKER_COLOUR, marker="+", linestyle="none",
                                         label=f"worst target [{_voxel_text(voxel)}]"))
        figure.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=9, frameon=False)
        caption = f"{title}\nSUV 0 (white) to {window_top:.1f} (black), head up, patient's right on the left"
        figure.suptitle(caption.replace("$", r"\$"), fontsize=10)  # "$" would start matplotlib's mathtext
        figure.tight_layout(rect=(0, 0.06, 1, 1))
        figure.savefig(path, dpi=90)
    finally:
        pyplot.close(figure)
    return path


def pyplot_agg():
    """matplotlib's pyplot on the Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ----------------------------------------------------------------------------------------------
# The page


PAGE_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 70em; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: left; font-size: 0.92em; }
th { background: #f2f2f2; }
section { border-top: 2px solid #ddd; margin-top: 1.5em; padding-top: 0.5em; }
img { max-width: 100%; }
.note { color: #8a4b00; }
"""


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
    worst_text = (f"voxel [{_voxel_text(worst['voxel'])}] ({worst.get('kind')}), noise score "
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
    parts = [f'<section id="rank-{rank}"><h3>{rank}. {html_escape(entry.image_id)}</h3>', _fields(rows)]
    parts += [f'<p class="note">{html_escape(text)}</p>' for text in (entry.note, note) if text]
    if figure is not None:
        alt = html_escape(f"MIPs and axial slice of {entry.image_id}")
        parts.append(f'<img src="{html_escape(figure)}" alt="{alt}">')
    parts.append("</section>")
    return "\n".join(parts)


def html_table(header: list, rows: list[list]) -> str:
    lines = ["<table>", "<tr>" + "".join(f"<th>{html_escape(cell)}</th>" for cell in header) + "</tr>"]
    lines += ["<tr>" + "".join(f"<td>{html_escape(cell)}</td>" for cell in row) + "</tr>" for row in rows]
    return "\n".join([*lines, "</table>"])


def _fields(rows: list[list]) -> str:
    """A two-column table: a name, its value."""
    lines = [f"<tr><th>{html_escape(name)}</th><td>{html_escape(value)}</td></tr>" for name, value in rows]
    return "\n".join(["<table>", *lines, "</table>"])


def html_escape(value) -> str:
    return html.escape(_cell(value), quote=True)
