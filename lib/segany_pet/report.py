"""The figures and HTML of the project's reports: the label audit (`segany_pet.active.audit`) and the curation QC
report (`segany_pet.curate.report`).

Frames: voxel indices of the stored image. Figures are drawn head up in the radiological convention (the
patient's right on the viewer's left, anterior on the left of the sagittal view), whatever the stored axis order.
"""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np

from segany_pet.pet import PETVolume
from segany_pet.pet.volume import BODY_SUV, superior_axis

# The SUV window's top: this percentile of the body's voxels, so a bladder or brain does not wash lesions out.
WINDOW_PERCENTILE = 99.5
LABEL_COLOUR, CONSENSUS_COLOUR, MARKER_COLOUR = "tab:blue", "tab:orange", "tab:green"


def cell_text(value) -> str:
    return "" if value is None else str(value)


def voxel_text(voxel) -> str | None:
    return " ".join(str(int(v)) for v in voxel) if voxel else None


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


def ras_voxel(voxel, shape, axes, reversed_axes) -> list[int]:
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
    xyz = ras_voxel(at, volume.shape, axes, reversed_axes)
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
            panel.set_title(f"{view} through [{voxel_text(at)}]" if view == "axial slice" else view, fontsize=9)
            panel.set_xticks([])
            panel.set_yticks([])
        handles = [pyplot.Line2D([], [], color=LABEL_COLOUR, label="stored label")]
        if consensus is not None:
            handles.append(pyplot.Line2D([], [], color=CONSENSUS_COLOUR, label="models' consensus"))
        if voxel:
            handles.append(pyplot.Line2D([], [], color=MARKER_COLOUR, marker="+", linestyle="none",
                                         label=f"worst target [{voxel_text(voxel)}]"))
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
# Pages


PAGE_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 70em; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: left; font-size: 0.92em; }
th { background: #f2f2f2; }
section { border-top: 2px solid #ddd; margin-top: 1.5em; padding-top: 0.5em; }
img { max-width: 100%; }
.note { color: #8a4b00; }
"""


def html_table(header: list, rows: list[list]) -> str:
    lines = ["<table>", "<tr>" + "".join(f"<th>{html_escape(cell)}</th>" for cell in header) + "</tr>"]
    lines += ["<tr>" + "".join(f"<td>{html_escape(cell)}</td>" for cell in row) + "</tr>" for row in rows]
    return "\n".join([*lines, "</table>"])


def html_fields(rows: list[list]) -> str:
    """A two-column table: a name, its value."""
    lines = [f"<tr><th>{html_escape(name)}</th><td>{html_escape(value)}</td></tr>" for name, value in rows]
    return "\n".join(["<table>", *lines, "</table>"])


def html_escape(value) -> str:
    return html.escape(cell_text(value), quote=True)
