"""The QC report of a curated datastore: ``report.json`` and ``index.html`` with plots and a MIP gallery.

Built from every curated case in the datastore (its QC numbers in ``.segany_pet/curate/qc/``, written at import)
and every open problem (``problems.json``), so it describes the datastore after all runs, not one run.
"""

from __future__ import annotations

import datetime
import json
from collections import Counter, defaultdict
from pathlib import Path

import nibabel as nib
import numpy as np

from segany_pet.curate.importer import PROBLEMS, QC_DIR, STATE, SUV_BINS
from segany_pet.jsonfile import read_json
from segany_pet.pet import load_nifti
from segany_pet.report import PAGE_STYLE, draw_figure, html_escape, html_table, pyplot_agg

GALLERY_CASES = 12
LESION_VOLUME_BINS = np.geomspace(0.01, 1000.0, 31)  # mL


def write_report(datastore, out_dir, run: dict | None = None, gallery: int = GALLERY_CASES) -> dict[str, Path]:
    """Write ``report.json``, ``index.html`` and its figures (``img/``) to ``out_dir``; returns their paths."""
    out_dir = Path(out_dir)
    (out_dir / "img").mkdir(parents=True, exist_ok=True)
    state = Path(datastore.folder) / STATE
    cases = []
    for image_id in sorted(datastore.list_images()):
        qc = read_json(state / QC_DIR / f"{image_id}.json", None)
        if qc is not None:
            cases.append(qc)
    problems = [entry for entries in read_json(state / PROBLEMS, {}).values() for entry in entries]
    summary = summarise(cases, problems)
    summary["written"] = datetime.datetime.now().isoformat(timespec="seconds")
    if run is not None:
        summary["last_run"] = run
    pyplot = pyplot_agg()
    figures = {"suv": _suv_histograms(pyplot, cases, out_dir / "img" / "suv_histograms.png"),
               "lesions": _lesion_volumes(pyplot, cases, out_dir / "img" / "lesion_volumes.png"),
               "grids": _grids(pyplot, cases, out_dir / "img" / "grids.png")}
    shown = []
    for qc in gallery_sample(cases, gallery):
        path = out_dir / "img" / f"mip_{qc['id']}.png"
        volume = load_nifti(datastore.get_image_uri(qc["id"]))
        label_id = datastore.get_label_by_image_id(qc["id"], "final")
        label = (np.asarray(nib.load(datastore.get_label_uri(label_id, "final")).dataobj) > 0 if label_id
                 else np.zeros(volume.shape, dtype=bool))
        title = f"{qc['id']} ({qc['source']}, {qc['tracer']}, {qc['label'] or 'unlabeled'})"
        draw_figure(pyplot, volume, label, None, None, path, title)
        shown.append((qc, f"img/{path.name}"))
    paths = {"json": out_dir / "report.json", "html": out_dir / "index.html"}
    paths["json"].write_text(json.dumps(summary, indent=1))
    paths["html"].write_text(html_page(summary, figures, shown))
    return paths


def summarise(cases: list[dict], problems: list[dict]) -> dict:
    """Counts per source, tracer and tier; target counts and volumes; grids; SUV histograms; problems."""
    by_source: dict[str, dict] = {}
    for qc in cases:
        row = by_source.setdefault(qc["source"], {"cases": 0, "voxels": 0, "tracers": Counter(), "tiers": Counter(),
                                                  "labels": Counter(), "lesions": 0, "lesion_ml": [],
                                                  "targets": Counter(), "suv_histogram": np.zeros(len(SUV_BINS) - 1)})
        row["cases"] += 1
        row["voxels"] += qc["voxels"]
        row["tracers"][qc["tracer"]] += 1
        row["tiers"][qc["tier"] or "unlabeled"] += 1
        row["labels"][qc["label"] or "unlabeled"] += 1
        row["lesions"] += len(qc["lesion_volumes_ml"])
        row["lesion_ml"] += qc["lesion_volumes_ml"]
        row["targets"].update(name for name in qc["targets"] if name != "lesion")
        row["suv_histogram"] += qc["suv_histogram"]
    sources = {}
    for name, row in sorted(by_source.items()):
        volumes = np.asarray(row["lesion_ml"])
        sources[name] = {
            "cases": row["cases"], "voxels": row["voxels"], "tracers": dict(row["tracers"]),
            "tiers": dict(row["tiers"]), "labels": dict(row["labels"]), "lesions": row["lesions"],
            "lesion_volume_ml": _quantiles(volumes), "cases_with_organ": dict(row["targets"]),
            "suv_histogram": row["suv_histogram"].astype(int).tolist(),
        }
    combos = Counter((qc["source"], qc["tracer"], qc["tier"] or "unlabeled") for qc in cases)
    return {
        "cases": len(cases), "voxels": int(sum(qc["voxels"] for qc in cases)),
        "sources": sources,
        "by_source_tracer_tier": [{"source": s, "tracer": t, "tier": tier, "cases": n}
                                  for (s, t, tier), n in sorted(combos.items())],
        "suv_bins": SUV_BINS.round(4).tolist(),
        "grids": [{"id": qc["id"], "source": qc["source"], "shape": qc["shape"], "spacing": qc["spacing"]}
                  for qc in cases],
        "problems": {"errors": sum(p["severity"] == "error" for p in problems),
                     "warnings": sum(p["severity"] == "warning" for p in problems), "list": problems},
    }


def _quantiles(values: np.ndarray) -> dict:
    if not values.size:
        return {}
    return {name: round(float(np.quantile(values, q)), 3) for name, q in
            (("min", 0.0), ("p25", 0.25), ("median", 0.5), ("p75", 0.75), ("max", 1.0))}


def gallery_sample(cases: list[dict], count: int) -> list[dict]:
    """Up to ``count`` cases, spread over the sources (round robin in id order), labeled ones first."""
    queues = defaultdict(list)
    for qc in sorted(cases, key=lambda qc: (qc["label"] != "labeled", qc["id"])):
        queues[qc["source"]].append(qc)
    chosen = []
    while len(chosen) < count and any(queues.values()):
        for source in sorted(queues):
            if queues[source] and len(chosen) < count:
                chosen.append(queues[source].pop(0))
    return chosen


# ----------------------------------------------------------------------------------------------
# Figures


def _suv_histograms(pyplot, cases: list[dict], path: Path) -> Path | None:
    totals = defaultdict(lambda: np.zeros(len(SUV_BINS) - 1))
    for qc in cases:
        totals[qc["source"]] += qc["suv_histogram"]
    if not totals:
        return None
    figure, axis = pyplot.subplots(figsize=(7, 3.6))
    centres = np.sqrt(SUV_BINS[:-1] * SUV_BINS[1:])
    for source, counts in sorted(totals.items()):
        axis.plot(centres, counts / max(counts.sum(), 1), label=source, linewidth=1.2)
    axis.set(xscale="log", yscale="log", xlabel=f"SUV (voxels above {SUV_BINS[0]:g})", ylabel="share of voxels",
             title="SUV distribution per source")
    axis.legend(fontsize=8)
    return _save(pyplot, figure, path)


def _lesion_volumes(pyplot, cases: list[dict], path: Path) -> Path | None:
    volumes = defaultdict(list)
    for qc in cases:
        volumes[qc["source"]] += qc["lesion_volumes_ml"]
    if not any(volumes.values()):
        return None
    figure, axis = pyplot.subplots(figsize=(7, 3.6))
    for source, values in sorted(volumes.items()):
        if values:
            axis.hist(np.clip(values, LESION_VOLUME_BINS[0], LESION_VOLUME_BINS[-1]), LESION_VOLUME_BINS,
                      histtype="step", linewidth=1.2, label=f"{source} ({len(values)})")
    axis.set(xscale="log", xlabel="lesion volume (mL, 26-connected components)", ylabel="lesions",
             title="Lesion volumes per source")
    axis.legend(fontsize=8)
    return _save(pyplot, figure, path)


def _grids(pyplot, cases: list[dict], path: Path) -> Path | None:
    if not cases:
        return None
    figure, (spacing_axis, size_axis) = pyplot.subplots(1, 2, figsize=(10, 3.6))
    for source in sorted({qc["source"] for qc in cases}):
        mine = [qc for qc in cases if qc["source"] == source]
        spacing_axis.scatter([np.mean(qc["spacing"][:2]) for qc in mine], [qc["spacing"][2] for qc in mine],
                             s=14, alpha=0.7, label=source)
        size_axis.scatter([qc["voxels"] / 1e6 for qc in mine], [qc["shape"][2] for qc in mine], s=14, alpha=0.7,
                          label=source)
    spacing_axis.set(xlabel="in-plane spacing (mm)", ylabel="slice spacing (mm)", title="Voxel spacing")
    size_axis.set(xlabel="voxels (millions)", ylabel="slices", title="Volume size")
    size_axis.legend(fontsize=8)
    return _save(pyplot, figure, path)


def _save(pyplot, figure, path: Path) -> Path:
    try:
        figure.tight_layout()
        figure.savefig(path, dpi=90)
    finally:
        pyplot.close(figure)
    return path


# ----------------------------------------------------------------------------------------------
# The page


def html_page(summary: dict, figures: dict[str, Path | None], shown: list[tuple[dict, str]]) -> str:
    sources = summary["sources"]
    problems = summary["problems"]
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8"><title>Cohort QC</title>',
        f"<style>{PAGE_STYLE}</style></head><body>",
        "<h1>Cohort QC</h1>",
        f"<p>Written {html_escape(summary['written'])}: {summary['cases']} curated cases, "
        f"{summary['voxels'] / 1e9:.2f} billion voxels, {problems['errors']} cases refused, "
        f"{problems['warnings']} warnings. Numbers: <a href=\"report.json\">report.json</a>.</p>",
    ]
    if "last_run" in summary:
        run = summary["last_run"]
        parts.append(f"<p>Last run: {run['cases']} cases in the sources, {run['imported']} imported, "
                     f"{run['unchanged']} unchanged, {run['errors']} refused, in {run['seconds']} s.</p>")
    parts.append("<h2>Sources</h2>")
    parts.append(html_table(
        ["source", "cases", "voxels (M)", "tracers", "tiers", "labels", "lesions", "lesion mL (median, max)",
         "cases with organ targets"],
        [[name, row["cases"], round(row["voxels"] / 1e6, 1), _counts(row["tracers"]), _counts(row["tiers"]),
          _counts(row["labels"]), row["lesions"],
          f"{row['lesion_volume_ml'].get('median', '-')}, {row['lesion_volume_ml'].get('max', '-')}",
          _counts(row["cases_with_organ"]) or "-"] for name, row in sources.items()]))
    parts.append("<h3>By source, tracer and tier</h3>")
    combos = summary["by_source_tracer_tier"]
    parts.append(html_table(["source", "tracer", "tier", "cases"],
                            [[r["source"], r["tracer"], r["tier"], r["cases"]] for r in combos]))
    for key, heading in (("suv", "SUV histograms"), ("lesions", "Lesion volumes"), ("grids", "Grids")):
        if figures.get(key) is not None:
            parts.append(f"<h2>{heading}</h2>")
            parts.append(f'<img src="img/{html_escape(figures[key].name)}" alt="{html_escape(heading)}">')
    parts.append(f"<h2>Problems ({problems['errors']} refused, {problems['warnings']} warnings)</h2>")
    if problems["list"]:
        parts.append(html_table(["severity", "source", "case", "reason", "path"],
                                [[p["severity"], p["source"], p["case"], p["reason"], p["path"]]
                                 for p in sorted(problems["list"], key=lambda p: (p["severity"], p["id"]))]))
    else:
        parts.append("<p>None.</p>")
    if shown:
        parts.append(f"<h2>Gallery ({len(shown)} cases; label outlined)</h2>")
        for qc, figure in shown:
            parts.append(f'<section><h3>{html_escape(qc["id"])}</h3><img src="{html_escape(figure)}" '
                         f'alt="{html_escape("MIPs of " + qc["id"])}"></section>')
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _counts(counter: dict) -> str:
    return ", ".join(f"{key} {value}" for key, value in sorted(counter.items()))
