"""The interactive evaluation's report: per-group means with case-resampled intervals (`summarise`), the
Markdown table, the plot of Dice over clicks and the files `segany-pet evaluate` writes."""

from __future__ import annotations

import json
import logging
import math
import statistics
from pathlib import Path

import numpy as np

from segany_pet.evaluate.interactive import REPORT_CLICKS

log = logging.getLogger(__name__)

GROUPS = ("all", "isolated", "touching")
BOOTSTRAP_DRAWS = 2000  # resamplings of the cases behind a mean's 95% interval


def _mean(values) -> float | None:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return round(statistics.fmean(values), 4) if values else None


def _in_group(row: dict, group: str) -> bool:
    return group == "all" or row["group"] == group


def case_bootstrap_interval(per_case, draws: int = BOOTSTRAP_DRAWS, seed: int = 0) -> list[float] | None:
    """95% interval of the mean over every value when whole cases are drawn again with replacement.

    ``per_case``: one list of values (lesion Dice) per case. Cases, not lesions, are the independent draws: the
    lesions of one scan share its uptake and noise. None with fewer than two cases holding values.
    """
    per_case = [np.asarray(values, dtype=float) for values in per_case if len(values)]
    if len(per_case) < 2:
        return None
    sums = np.array([values.sum() for values in per_case])
    counts = np.array([len(values) for values in per_case])
    picks = np.random.default_rng(seed).integers(0, len(per_case), size=(draws, len(per_case)))
    means = sums[picks].sum(axis=1) / counts[picks].sum(axis=1)
    return [round(float(bound), 4) for bound in np.percentile(means, [2.5, 97.5])]


def summarise(
    model_cases: list[dict], baseline_rows: list[dict] = (), autopet_cases: list[dict] = (), report_clicks=REPORT_CLICKS
) -> dict:
    """Means over lesions (per group) and over cases of `evaluate_case`, `evaluate_baselines` and
    `evaluate_autopet_iv` results; per group, the 95% interval of the one-click mean (`case_bootstrap_interval`)."""
    lesions = [row for case in model_cases for row in case["lesions"]]
    in_group = {g: [r for r in lesions if _in_group(r, g)] for g in GROUPS}
    clicks = max((len(r["dice"]) for r in lesions), default=0)
    model = {
        group: {
            "n": len(rows),
            "dice_curve": [_mean(r["dice"][k] for r in rows) for k in range(clicks)],
            "dice_at": {str(k): _mean(r["dice"][k - 1] for r in rows) for k in report_clicks if k <= clicks},
            "dice_1click_ci95": case_bootstrap_interval(
                [[r["dice"][0] for r in case["lesions"] if _in_group(r, group)] for case in model_cases]
            ),
        }
        for group, rows in in_group.items()
    }
    summary = {
        "cases": len(model_cases),
        "lesions": len(lesions),
        "model": model,
        "model_case": {key: _mean(c[key] for c in model_cases) for key in ("dice", "fpv_ml", "fnv_ml")},
    }
    if baseline_rows:
        methods = list(dict.fromkeys(r["method"] for r in baseline_rows))
        baselines = {}
        for method in methods:
            rows = [r for r in baseline_rows if r["method"] == method]
            per_case = {r["case"]: r for r in rows}.values()
            baselines[method] = {
                **{g: {"n": len(sel), "dice": _mean(r["dice"] for r in sel)}
                   for g in GROUPS for sel in [[r for r in rows if _in_group(r, g)]]},
                "fpv_ml": _mean(r["case_fpv_ml"] for r in per_case),
                "fnv_ml": _mean(r["case_fnv_ml"] for r in per_case),
            }
        best = max(methods, key=lambda m: baselines[m]["all"]["dice"] or 0.0)
        summary["baselines"] = baselines
        summary["best_baseline"] = best
        first = model["all"]["dice_at"].get("1")
        if first is not None and baselines[best]["all"]["dice"] is not None:
            summary["margin_over_best_baseline_1click"] = round(first - baselines[best]["all"]["dice"], 4)
    if autopet_cases:
        steps = min(len(c["dice"]) for c in autopet_cases)
        summary["autopet_iv"] = {
            "cases": len(autopet_cases),
            **{key: [_mean(c[key][s] for c in autopet_cases) for s in range(steps)]
               for key in ("dice", "fpv_ml", "fnv_ml")},
            **{f"auc_{key}": _mean(c[f"auc_{key}"] for c in autopet_cases) for key in ("dice", "fpv_ml", "fnv_ml")},
        }
    return summary


def _cell(value, n=None) -> str:
    text = "-" if value is None else f"{value:.3f}"
    return text if n is None else f"{text} ({n})"


def markdown_table(summary: dict, title: str = "Interactive evaluation") -> str:
    model, baselines = summary["model"], summary.get("baselines", {})
    click_columns = list(model["all"]["dice_at"])
    head = ["lesions (n)", *[f"model, {k} click{'s' if k != '1' else ''}" for k in click_columns], *baselines]
    lines = [f"## {title}", "", f"{summary['lesions']} lesions in {summary['cases']} cases. Mean per-lesion Dice; "
             "baselines from the same centre click.", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for group in GROUPS:
        if model[group]["n"] == 0:
            continue
        cells = [f"{group} ({model[group]['n']})", *[_cell(model[group]["dice_at"][k]) for k in click_columns]]
        cells += [_cell(baselines[m][group]["dice"]) for m in baselines]
        lines.append("| " + " | ".join(cells) + " |")
    intervals = [f"{group} {ci[0]:.3f}-{ci[1]:.3f}" for group in GROUPS if (ci := model[group].get("dice_1click_ci95"))]
    if intervals:
        lines += ["", f"95% interval of the mean after 1 click, cases resampled ({BOOTSTRAP_DRAWS} draws): "
                      + "; ".join(intervals) + "."]
    case = summary["model_case"]
    lines += ["", "| per case (mean) | Dice of union | FPV mL | FNV mL |", "|---|---|---|---|",
              f"| model, after {len(model['all']['dice_curve'])} clicks | {_cell(case['dice'])} | "
              f"{_cell(case['fpv_ml'])} | {_cell(case['fnv_ml'])} |"]
    for method, row in baselines.items():
        lines.append(f"| {method}, 1 click | - | {_cell(row['fpv_ml'])} | {_cell(row['fnv_ml'])} |")
    if "best_baseline" in summary:
        lines += ["", f"Best baseline: {summary['best_baseline']}; model after 1 click minus best baseline: "
                      f"{_cell(summary.get('margin_over_best_baseline_1click'))}."]
    if "autopet_iv" in summary:
        auto = summary["autopet_iv"]
        lines += ["", f"### autoPET IV protocol ({auto['cases']} cases)", "",
                  "| step | " + " | ".join(str(s) for s in range(len(auto["dice"]))) + " | AUC |",
                  "|" + "---|" * (len(auto["dice"]) + 2)]
        for key, label in (("dice", "Dice"), ("fpv_ml", "FPV mL"), ("fnv_ml", "FNV mL")):
            cells = " | ".join(_cell(v) for v in auto[key])
            lines.append(f"| {label} | {cells} | {_cell(auto['auc_' + key])} |")
    return "\n".join(lines) + "\n"


def plot_dice_over_clicks(summary: dict, path, title: str = "Dice over clicks") -> Path | None:
    """A PNG of mean Dice after each click per group, baselines as markers at one click; None without
    matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no plot written")
        return None
    figure, axis = plt.subplots(figsize=(6, 4))
    styles = {"all": "-", "isolated": "--", "touching": ":"}
    for group in GROUPS:
        curve = summary["model"][group]["dice_curve"]
        if summary["model"][group]["n"]:
            axis.plot(range(1, len(curve) + 1), curve, styles[group], marker="o", label=f"model, {group}")
    markers = "sDv^<>"
    for index, (method, row) in enumerate(summary.get("baselines", {}).items()):
        axis.plot([1], [row["all"]["dice"]], markers[index % len(markers)], linestyle="none", label=method)
    clicks = len(summary["model"]["all"]["dice_curve"])
    axis.set_xticks(range(1, clicks + 1))
    axis.set_xlabel("clicks per lesion")
    axis.set_ylabel("mean lesion Dice")
    axis.set_ylim(0, 1)
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def write_report(summary: dict, out_dir, *, name: str = "interactive_eval", title: str = "Interactive evaluation",
                 details: dict | None = None) -> dict[str, Path]:
    """Write ``<name>.md``, ``<name>.json`` (summary plus ``details``, e.g. the per-case results) and
    ``<name>.png`` (when matplotlib is installed) to ``out_dir``; returns the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out / f"{name}.md", "json": out / f"{name}.json"}
    paths["markdown"].write_text(markdown_table(summary, title))
    paths["json"].write_text(json.dumps({"summary": summary, **(details or {})}, indent=1, default=_json_default))
    plot = plot_dice_over_clicks(summary, out / f"{name}.png", title)
    if plot is not None:
        paths["plot"] = plot
    return paths


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")
