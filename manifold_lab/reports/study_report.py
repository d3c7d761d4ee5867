"""The report of a study (``reports/<study>/``), drawn from its stored ``results.json`` dict alone.

A study asks one question (which latent property tracks gFID?) over few, expensive runs, so the report
has to show the evidence and its weakness side by side: every run with its status (a failed run shows
its error instead of silently vanishing), the Fig. 2-style panels (metric vs gFID, one point per
variant, seed spread as error bars), correlation coefficients with bootstrap intervals
(:mod:`manifold_lab.studies.stats`), the seed-to-seed spread, and the wall time of every stage. The
"What the data show" section is generated from those numbers, and says so when n is too small or an
interval includes 0, so the prose can never claim more than the table does.

Nothing is recomputed here: ``manifold-lab report <study>`` redraws everything in seconds.
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from manifold_lab.errors import ManifoldLabError  # noqa: E402
from manifold_lab.io import write_json, write_text  # noqa: E402
from manifold_lab.reports.compare_report import _fmt  # noqa: E402
from manifold_lab.reports.figures import _save  # noqa: E402
from manifold_lab.studies.stats import (DIRECTION, correlate, correlation_table, expected_sign,  # noqa: E402
                                        variant_table)

#: Axis labels: what the number is (unit) and which way is better.
AXIS_LABELS: dict[str, str] = {
    "SSC": "SSC (NMI, higher better)",
    "LPC": "LPC (perceptual distance, lower better)",
    "GSQ": "GSQ (1-NN accuracy, higher better)",
    "eRank": "eRank (effective rank, diagnostic)",
    "eRank/C": "eRank / C (fraction of channels, diagnostic)",
    "PSNR": "PSNR (dB, higher better)",
    "SSIM": "SSIM (higher better)",
    "perceptual": "perceptual distance (lower better)",
    "rFID": "rFID (lower better)",
    "gFID": "gFID (lower better)",
    "IS": "IS (higher better)",
    "precision": "precision (higher better)",
    "recall": "recall (higher better)",
}

#: Columns of the per-run results table, with the decimals each is printed with.
RUN_COLUMNS: tuple[tuple[str, int], ...] = (("SSC", 3), ("LPC", 3), ("GSQ", 3), ("eRank/C", 3), ("PSNR", 2),
                                            ("rFID", 1), ("gFID", 1), ("IS", 2), ("precision", 3), ("recall", 3))
PROFILE_METRICS = ("SSC", "LPC", "GSQ", "eRank/C", "PSNR", "rFID", "gFID")
SPREAD_METRICS = tuple(name for name, _ in RUN_COLUMNS)
TARGET = "gFID"
SMALL_N = 5  # below this many variants a bootstrap interval is too optimistic to count as evidence


# ------------------------------------------------------------------------------------------------ input

def _check_results(results: Any) -> dict[str, Any]:
    if not isinstance(results, dict) or not isinstance(results.get("runs"), list):
        raise ManifoldLabError("a study report needs the results dict of results.json (with a 'runs' list); "
                               "regenerate it with `manifold-lab study run STUDY`")
    if not isinstance(results.get("study", {}), dict):
        raise ManifoldLabError("results['study'] must be the study as a dict; regenerate results.json with "
                               "`manifold-lab study run STUDY`")
    return results


def _study(results: dict[str, Any]) -> dict[str, Any]:
    return results.get("study") or {}


def _panels(results: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in (_study(results).get("panels") or []) if isinstance(p, dict) and p.get("name")]


def _title(results: dict[str, Any]) -> str:
    study = _study(results)
    return study.get("title") or study.get("name") or "Study"


def _num(v: Any) -> float:
    """A finite float or NaN (None, strings and infinities become NaN)."""
    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v)):
        return float(v)
    return float("nan")


def _direction_word(metric: str) -> str:
    return {1: "higher better", -1: "lower better"}.get(DIRECTION.get(metric, 0), "diagnostic")


# ----------------------------------------------------------------------------------------- panel figure

def _point_label(panel: dict[str, Any], row: dict[str, Any]) -> str:
    x = row.get("x")
    if x is None:
        return row["label"]
    value = f"{float(x):g}"
    return f"{panel['x_label']}={value}" if panel.get("x_label") else value


def _coef_text(v: float | None) -> str:
    return "n/a" if v is None else f"{v:+.2f}"


def _draw_panel(ax, panel: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    metric = panel.get("metric", "rFID")
    pts = [r for r in rows if not math.isnan(_num(r.get(metric))) and not math.isnan(_num(r.get(TARGET)))]
    ax.set_title(panel.get("title") or panel["name"], fontsize=10)
    ax.set_xlabel(AXIS_LABELS.get(metric, metric), fontsize=9)
    ax.set_ylabel(AXIS_LABELS[TARGET], fontsize=9)
    ax.grid(alpha=0.3)
    if not pts:
        ax.text(0.5, 0.5, f"no finished variant\nwith {metric} and {TARGET}", transform=ax.transAxes,
                ha="center", va="center", fontsize=9, color="0.4")
        return
    xs = np.array([_num(r[metric]) for r in pts])
    ys = np.array([_num(r[TARGET]) for r in pts])
    xerr = np.nan_to_num([_num(r.get(f"{metric}_sd")) for r in pts])
    yerr = np.nan_to_num([_num(r.get(f"{TARGET}_sd")) for r in pts])
    if xerr.any() or yerr.any():
        ax.errorbar(xs, ys, xerr=xerr, yerr=yerr, fmt="none", ecolor="0.35", elinewidth=0.9, capsize=3,
                    zorder=2, label="± seed sd")
    order = np.argsort(np.argsort([_num(r.get("x")) for r in pts]))  # colour encodes the swept value
    colours = plt.get_cmap("viridis")(order / max(1, len(pts) - 1))
    ax.scatter(xs, ys, c=colours, s=42, edgecolors="black", linewidths=0.6, zorder=3,
               label="variant (seed mean)")
    for r, x, y in zip(pts, xs, ys):
        ax.annotate(_point_label(panel, r), (x, y), xytext=(4, 4), textcoords="offset points", fontsize=7)
    if len(pts) >= 2 and np.ptp(xs) > 0:
        slope, icpt = np.polyfit(xs, ys, 1)
        grid = np.linspace(xs.min(), xs.max(), 50)
        ax.plot(grid, slope * grid + icpt, "--", color="C3", lw=1.2, zorder=1, label=f"OLS fit (slope {slope:.3g})")
    c = correlate(xs, ys, n_boot=0)
    stats_text = f"n = {c['n']}   Pearson r = {_coef_text(c['pearson'])}\nSpearman ρ = {_coef_text(c['spearman'])}"
    if c["reason"]:
        stats_text += f" ({c['reason']})"
    ax.margins(x=0.15, y=0.12)  # room for the point annotations
    ax.legend(title=stats_text, title_fontsize=7.5, fontsize=7, loc="best", framealpha=0.9)


def panel_figure(results: dict[str, Any], path: str | Path) -> Path | None:
    """Fig. 2-style: one subplot per declared panel, its metric against gFID; None if no panel is declared."""
    results = _check_results(results)
    panels = _panels(results)
    if not panels:
        return None
    table = variant_table(results["runs"])
    ncols = min(4, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.4 * ncols, 4.0 * nrows), squeeze=False)
    for ax, panel in zip(axes.flat, panels):
        _draw_panel(ax, panel, [r for r in table if panel["name"] in r["panels"]])
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(f"{_title(results)}\nlatent metric vs {TARGET}, one point per variant (mean over finished seeds)",
                 fontsize=10)
    fig.tight_layout()
    return _save(fig, Path(path))


# --------------------------------------------------------------------------------------- profile figure

def _group(row: dict[str, Any], titles: dict[str, str]) -> str:
    panels = row["panels"]
    if len(panels) > 1:
        return "shared by several panels"
    return titles.get(panels[0], panels[0]) if panels else "no panel"


def profile_figure(results: dict[str, Any], path: str | Path) -> Path:
    """Grouped bars (Fig. 6(b) style): one subplot per metric, one bar per variant, seed-sd error bars."""
    results = _check_results(results)
    table = variant_table(results["runs"])
    titles = {p["name"]: p.get("title") or p["name"] for p in _panels(results)}
    # colour by panel; a study without panels (a zoo) is coloured by tokenizer instead
    by_panel = any(r["panels"] for r in table)
    group_of = [_group(r, titles) if by_panel else str(r.get("tokenizer") or r["label"]) for r in table]
    groups = list(dict.fromkeys(group_of))
    colour_of = {g: plt.get_cmap("tab10")(i % 10) for i, g in enumerate(groups)}
    colours = [colour_of[g] for g in group_of]
    n = len(table)
    ncols = 4 if n <= 6 else 2
    nrows = math.ceil((len(PROFILE_METRICS) + 1) / ncols)
    width = max(3.4, 0.32 * n + 1.4)
    fig, axes = plt.subplots(nrows, ncols, figsize=(ncols * width, nrows * (3.2 if n <= 6 else 3.9)),
                             squeeze=False)
    x = np.arange(n)
    labels = [r["label"] for r in table]
    for ax, metric in zip(axes.flat, PROFILE_METRICS):
        vals = np.array([_num(r.get(metric)) for r in table])
        err = np.array([_num(r.get(f"{metric}_sd")) for r in table])
        ax.bar(x, np.nan_to_num(vals), color=colours, edgecolor="black", linewidth=0.5)
        has_sd = ~np.isnan(err) & ~np.isnan(vals)  # no bar for a variant with one seed: its sd is unknown
        if has_sd.any():
            ax.errorbar(x[has_sd], vals[has_sd], yerr=err[has_sd], fmt="none", ecolor="black", elinewidth=0.8,
                        capsize=2)
        for i in np.flatnonzero(np.isnan(vals)):
            ax.text(i, 0, "n/a", rotation=90, ha="center", va="bottom", fontsize=6, color="0.4")
        ax.set_title(f"{metric} ({_direction_word(metric)})", fontsize=9)
        ax.set_ylabel(AXIS_LABELS.get(metric, metric), fontsize=7.5)
        ax.set_xticks(x, labels, rotation=60 if n > 6 else 30, ha="right", fontsize=7)
        ax.grid(axis="y", alpha=0.3)
    spare = list(axes.flat)[len(PROFILE_METRICS):]
    for ax in spare:
        ax.axis("off")
    handles = [matplotlib.patches.Patch(facecolor=colour_of[g], edgecolor="black", label=g) for g in groups]
    spare[0].legend(handles=handles, loc="center", fontsize=8,
                    title="variant group (panel)" if by_panel else "tokenizer", title_fontsize=8, frameon=False)
    fig.suptitle(f"{_title(results)}\nper-variant profile: mean over finished seeds, error bars = seed sd "
                 "(variants with several seeds)", fontsize=10)
    fig.tight_layout()
    return _save(fig, Path(path))


# ------------------------------------------------------------------------------------ correlation heatmap

def _heatmap_columns(rows: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    subsets = [s for s in dict.fromkeys(r["subset"] for r in rows) if s != "all"]
    return ([("all", "pearson", "Pearson r\nall"), ("all", "spearman", "Spearman ρ\nall"),
             ("all", "kendall", "Kendall τ\nall")] + [(s, "spearman", f"Spearman ρ\n{s}") for s in subsets])


def correlation_heatmap(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """Rows = metrics; columns = Pearson/Spearman/Kendall over all variants, then Spearman per panel."""
    if not rows:
        raise ManifoldLabError("no correlation rows to draw; build them with "
                               "manifold_lab.studies.stats.correlation_table(results)")
    metrics = list(dict.fromkeys(r["metric"] for r in rows))
    columns = _heatmap_columns(rows)
    cell = {(r["metric"], r["subset"]): r for r in rows}
    values = np.full((len(metrics), len(columns)), np.nan)
    fig, ax = plt.subplots(figsize=(1.15 * len(columns) + 3.2, 0.6 * len(metrics) + 2.0))
    cmap = plt.get_cmap("RdBu_r").with_extremes(bad="0.85")
    for i, metric in enumerate(metrics):
        for j, (subset, method, _) in enumerate(columns):
            row = cell.get((metric, subset))
            v = None if row is None else row.get(method)
            values[i, j] = np.nan if v is None else v
            n = "-" if row is None else row.get("n")
            text = ("n/a" if v is None else f"{v:+.2f}") + f"\nn={n}"
            ax.text(j, i, text, ha="center", va="center", fontsize=7,
                    color="white" if v is not None and abs(v) > 0.6 else "black")
    im = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=-1, vmax=1, aspect="auto")
    target = rows[0].get("target", TARGET)
    ax.set_xticks(range(len(columns)), [c[2] for c in columns], fontsize=7.5)
    ax.set_yticks(range(len(metrics)),
                  [f"{m} (exp. {expected_sign(m, target) or 'none'})" for m in metrics], fontsize=8)
    if len(columns) > 3:
        ax.axvline(2.5, color="black", lw=1.5)
    ax.set_xlabel("coefficient (subset of variants: all, or one panel)", fontsize=8)
    ax.set_ylabel("metric (expected sign of the correlation)", fontsize=8)
    ax.set_title(f"Correlation of each metric with {target} over seed-averaged variants", fontsize=10)
    fig.colorbar(im, ax=ax, label=f"correlation with {target} (−1 … +1)", fraction=0.04, pad=0.02)
    fig.tight_layout()
    return _save(fig, Path(path))


# ------------------------------------------------------------------------------------------ seed spread

def seed_spread_table(results: dict[str, Any], metrics: Sequence[str] = SPREAD_METRICS) -> list[dict[str, Any]]:
    """For each variant with more than one done seed: per metric the mean, sd (ddof=1), min and max."""
    results = _check_results(results)
    done: dict[str, list[dict[str, Any]]] = {}
    for r in results["runs"]:
        if r.get("status") == "done":
            done.setdefault(r["label"], []).append(r)
    out = []
    for label, runs in done.items():
        if len(runs) < 2:
            continue
        for metric in metrics:
            pairs = [(r.get("seed"), _num((r.get("metrics") or {}).get(metric))) for r in runs]
            pairs = [(s, v) for s, v in pairs if not math.isnan(v)]
            if not pairs:
                continue
            vals = np.array([v for _, v in pairs])
            out.append({"label": label, "metric": metric, "n_seeds": len(vals), "seeds": [s for s, _ in pairs],
                        "mean": float(vals.mean()), "sd": float(vals.std(ddof=1)) if len(vals) > 1 else None,
                        "min": float(vals.min()), "max": float(vals.max())})
    return out


# -------------------------------------------------------------------------------------- markdown pieces

def _md_cell(text: Any) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _md_table(head: Sequence[str], body: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in body]
    return "\n".join(lines)


def _status_cell(run: dict[str, Any]) -> str:
    status = run.get("status", "pending")
    if status == "failed":
        return f"failed: {run['error']}" if run.get("error") else "failed"
    return status


def _run_table(runs: list[dict[str, Any]]) -> str:
    head = ["variant", "seed", "status", *[AXIS_LABELS.get(m, m).split(" (")[0] for m, _ in RUN_COLUMNS]]
    body = []
    for r in runs:
        m = r.get("metrics") or {}
        body.append([r["label"], r.get("seed", ""), _status_cell(r),
                     *[_fmt(None if math.isnan(_num(m.get(k))) else float(m[k]), d) for k, d in RUN_COLUMNS]])
    return _md_table(head, body)


def _coef_ci(row: dict[str, Any], method: str) -> str:
    v = row.get(method)
    if v is None:
        return f"n/a ({row['reason']})" if row.get("reason") else "n/a"
    ci = row.get(f"{method}_ci")
    return f"{v:+.2f} [{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci else f"{v:+.2f} (no CI)"


def _agree_word(v: bool | None) -> str:
    return {True: "yes", False: "no"}.get(v, "—")


def _correlation_md(rows: list[dict[str, Any]]) -> str:
    head = ["metric", "subset", "n", "Pearson r [CI]", "Spearman ρ [CI]", "Kendall τ [CI]", "expected sign",
            "agrees"]
    body = [[r["metric"], r["subset"], r["n"], _coef_ci(r, "pearson"), _coef_ci(r, "spearman"),
             _coef_ci(r, "kendall"), r["expected"] or "none", _agree_word(r["agrees"])] for r in rows]
    return _md_table(head, body)


def _spread_md(spread: list[dict[str, Any]]) -> str:
    head = ["variant", "metric", "seeds", "mean", "sd", "min", "max"]
    body = [[s["label"], s["metric"], ", ".join(str(x) for x in s["seeds"]), _fmt(s["mean"]), _fmt(s["sd"]),
             _fmt(s["min"]), _fmt(s["max"])] for s in spread]
    return _md_table(head, body)


def _minutes(seconds: Any) -> str:
    v = _num(seconds)
    return "—" if math.isnan(v) else f"{v / 60:.1f}"


def _stages(results: dict[str, Any]) -> list[str]:
    stages = list(_study(results).get("stages") or [])
    for r in results["runs"]:
        stages += [s for s in (r.get("stage_seconds") or {}) if s not in stages]
    return stages


def _wall_time_md(results: dict[str, Any]) -> str:
    stages = _stages(results)
    body, totals = [], {s: 0.0 for s in stages}
    for r in results["runs"]:
        secs = r.get("stage_seconds") or {}
        for s in stages:
            totals[s] += 0.0 if math.isnan(_num(secs.get(s))) else _num(secs.get(s))
        run_total = sum(0.0 if math.isnan(_num(v)) else _num(v) for v in secs.values())
        body.append([r.get("run_id", r["label"]), *[_minutes(secs.get(s)) for s in stages], _minutes(run_total)])
    body.append(["**total**", *[f"**{_minutes(totals[s])}**" for s in stages],
                 f"**{_minutes(sum(totals.values()))}**"])
    medians = [_median([_num((r.get("stage_seconds") or {}).get(s)) for r in results["runs"]]) for s in stages]
    body.append(["*median*", *[f"*{_minutes(m)}*" for m in medians],
                 f"*{_minutes(sum(m for m in medians if not math.isnan(m)))}*"])
    return _md_table(["run", *stages, "run total"], body)


def _median(values: list[float]) -> float:
    """Median of the finished stages: robust to a stage slowed by a busy machine or a paused run."""
    done = [v for v in values if not math.isnan(v)]
    return statistics.median(done) if done else math.nan


# ------------------------------------------------------------------------------------------------ prose

def _counts(runs: list[dict[str, Any]]) -> dict[str, int]:
    out = {"done": 0, "failed": 0, "pending": 0}
    for r in runs:
        status = r.get("status", "pending")
        out[status if status in out else "pending"] += 1
    return out


def _seed_summary(results: dict[str, Any]) -> str:
    study = _study(results)
    default = study.get("seeds") or [0]
    own = [f"{v['label']}: {', '.join(map(str, v['seeds']))}" for v in (study.get("variants") or [])
           if isinstance(v, dict) and v.get("seeds") is not None and list(v["seeds"]) != list(default)]
    text = f"seed{'s' if len(default) > 1 else ''} {', '.join(map(str, default))}"
    return text + (f" (except {'; '.join(own)})" if own else "")


def _caption(results: dict[str, Any]) -> str:
    study, runs = _study(results), results["runs"]
    budget = results.get("budget") or study.get("default_budget") or "?"
    note = results.get("budget_note") or ((study.get("budgets") or {}).get(budget) or {}).get("note") or ""
    labels = list(dict.fromkeys(r["label"] for r in runs))
    c = _counts(runs)
    parts = [study.get("caption", "").strip(),
             f"Budget `{budget}`" + (f": {note.strip()}" if note else "."),
             f"Stages: {' → '.join(_stages(results)) or 'none recorded'}.",
             f"{len(labels)} variants ({', '.join(labels)}) at {_seed_summary(results)}: {len(runs)} runs, "
             f"{c['done']} done, {c['failed']} failed, {c['pending']} pending.",
             f"Results collected {results.get('created', 'at an unrecorded time')}."]
    return " ".join(p if p.endswith(".") else p + "." for p in parts if p)


def _left_out_md(runs: list[dict[str, Any]]) -> list[str]:
    out = []
    for r in runs:
        if r.get("status") == "done":
            continue
        finished = ", ".join(r.get("stage_seconds") or {}) or "none"
        what = f"failed — `{_md_cell(r['error'])}`" if r.get("status") == "failed" and r.get("error") else \
            r.get("status", "pending")
        out.append(f"- `{r.get('run_id', r['label'])}` ({r['label']}, seed {r.get('seed', '?')}): {what} "
                   f"(stages finished: {finished})")
    return out


def _strength(rho: float) -> str:
    a = abs(rho)
    return "weak" if a < 0.3 else "moderate" if a < 0.7 else "strong"


def _ci_has_zero(row: dict[str, Any]) -> bool | None:
    ci = row.get("spearman_ci")
    return None if not ci else ci[0] <= 0 <= ci[1]


RECONSTRUCTION = ("rFID", "PSNR")  # the paper argues these do not predict gFID; their "expected" sign is the naive one


def _panel_sentence(panel: dict[str, Any], row: dict[str, Any] | None) -> str:
    metric = panel.get("metric", "rFID")
    head = f"- **{panel.get('title') or panel['name']}** — {metric} vs {TARGET}"
    if row is None or row.get("spearman") is None:
        n = 0 if row is None else row["n"]
        why = "too few finished variants (at least 3 are needed)" if (row is None or row.get("reason")
                                                                     == "too few points") else \
            f"{metric} or {TARGET} is constant across the variants"
        return f"{head}: no correlation can be computed, {why}; n = {n}. Nothing can be concluded yet."
    rho, n = row["spearman"], row["n"]
    ci = row.get("spearman_ci")
    text = (f"{head} over n = {n} variants: Spearman ρ = {rho:+.2f}" + (f" [{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci else "")
            + f" (Pearson r = {_coef_text(row.get('pearson'))}), a {_strength(rho)} "
            + ("positive" if rho > 0 else "negative" if rho < 0 else "null") + " rank relation")
    exp = row.get("expected")
    if exp and metric in RECONSTRUCTION:
        text += ("; if reconstruction predicted generation the sign would be "
                 f"{'negative' if exp == '-' else 'positive'} ({metric} is {_direction_word(metric)}), and it "
                 f"{'is' if row.get('agrees') else 'is not'}.")
    elif exp:
        text += (f"; the paper expects a {'negative' if exp == '-' else 'positive'} sign ({metric} is "
                 f"{_direction_word(metric)}), so this {'agrees' if row.get('agrees') else 'does not agree'} "
                 "with it.")
    else:
        text += f"; {metric} is diagnostic, so no sign is expected."
    zero = _ci_has_zero(row)
    if zero is None:
        text += " No bootstrap interval could be formed."
    elif zero:
        text += f" The {round(100 * row.get('ci', 0.95))}% CI includes 0: the sign is not established at this n."
    if n < SMALL_N:
        text += (f" With only {n} variants any estimate is fragile, and a bootstrap interval from so few points "
                 "understates the uncertainty.")
    if metric in RECONSTRUCTION:
        claim = (" The paper's pilot claims reconstruction does not predict generation (rFID keeps improving as "
                 "the bottleneck widens while gFID does not); ")
        if n < SMALL_N:
            text += claim + f"with {n} variants these data can neither support nor refute that claim."
        elif zero is False and abs(rho) >= 0.3 and row.get("agrees") is False:
            text += claim + (f"here better {metric} went with worse {TARGET} (CI excludes 0), the "
                             "reconstruction-generation trade-off behind that claim: these data agree with it.")
        elif zero is False and abs(rho) >= 0.3:
            text += claim + (f"here {metric} does track {TARGET} (CI excludes 0), contrary to that claim at "
                             "this budget.")
        else:
            text += claim + "these data establish no relation, consistent with (but not proof of) that claim."
    return text


def _overall_sentence(rows: list[dict[str, Any]], has_panels: bool = True) -> str:
    alls = [r for r in rows if r["subset"] == "all" and r.get("spearman") is not None]
    if not alls:
        return "- Over all variants no correlation could be computed (too few finished variants with gFID)."
    alls.sort(key=lambda r: -abs(r["spearman"]))
    items = []
    for r in alls:
        note = ""
        if r["expected"]:
            note = f"expected {r['expected']}, {'agrees' if r['agrees'] else 'disagrees'}"
        if _ci_has_zero(r):
            note += ("; " if note else "") + "CI includes 0"
        items.append(f"{r['metric']} ρ = {r['spearman']:+.2f}" + (f" ({note})" if note else ""))
    ns = sorted({r["n"] for r in alls})
    n_text = f"n = {ns[0]}" if len(ns) == 1 else f"n = {ns[0]}-{ns[-1]} by metric"
    missing = [f"{r['metric']} ({r['reason']})" for r in rows if r["subset"] == "all" and r.get("spearman") is None]
    if missing:
        items.append("not computable: " + ", ".join(missing))
    caveat = ("Variants of different sweeps differ in more than one factor, so the per-panel rows are the "
              "controlled comparisons." if has_panels else
              "The variants differ in architecture and recipe, not in one controlled factor, so these "
              "coefficients describe this set of tokenizers, not what causes their gFID.")
    return f"- Over all variants ({n_text}), ranked by |ρ| with {TARGET}: " + "; ".join(items) + ". " + caveat


def _spread_sentence(spread: list[dict[str, Any]], table: list[dict[str, Any]]) -> str:
    gfid = [s for s in spread if s["metric"] == TARGET and s["sd"] is not None]
    if not gfid:
        return ("- No variant has more than one finished seed, so the seed-to-seed spread of gFID is unknown: "
                "differences between variants cannot be told apart from seed noise.")
    means = [r[TARGET] for r in table if r.get(TARGET) is not None]
    span = (max(means) - min(means)) if len(means) > 1 else 0.0
    sds = ", ".join(f"{s['label']}: sd {s['sd']:.2f} over {s['n_seeds']} seeds" for s in gfid)
    return (f"- Seed spread of gFID ({sds}) against a spread of {span:.2f} between variant means: differences "
            "between variants smaller than about twice the seed sd are within seed noise.")


def _findings_md(results: dict[str, Any], rows: list[dict[str, Any]], spread: list[dict[str, Any]],
                 table: list[dict[str, Any]]) -> list[str]:
    cell = {(r["metric"], r["subset"]): r for r in rows}
    out = [_panel_sentence(p, cell.get((p.get("metric"), p["name"]))) for p in _panels(results)]
    has_panels = bool(out)
    if not has_panels:
        out.append("- The study declares no panels, so there is no controlled sweep to read.")
    out.append(_overall_sentence(rows, has_panels))
    out.append(_spread_sentence(spread, table))
    left = sum(1 for r in results["runs"] if r.get("status") != "done")
    if left:
        out.append(f"- {left} run(s) are failed or pending and are left out of every statistic above.")
    return out


def _commands_md(results: dict[str, Any]) -> list[str]:
    commands = results.get("commands") or {}
    if not commands:
        return ["(no commands were recorded in results.json)"]
    what = {"run": "run or resume the study (only missing stages are computed)",
            "report": "redraw this report from results.json (nothing is recomputed)"}
    return [f"- {what.get(k, k)}: `{v}`" for k, v in commands.items()]


# ---------------------------------------------------------------------------------------------- outputs

def _csv_rows(rows: list[dict[str, Any]]) -> str:
    flat = []
    for r in rows:
        d = {k: v for k, v in r.items() if not k.endswith("_ci") or k == "ci"}
        for m in ("pearson", "spearman", "kendall"):
            ci = r.get(f"{m}_ci")
            d[f"{m}_ci_lo"], d[f"{m}_ci_hi"] = (ci[0], ci[1]) if ci else (None, None)
        flat.append(d)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(flat[0]) if flat else ["metric"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(flat)
    return buf.getvalue()


def _figures_md(results: dict[str, Any], panels_png: Path | None) -> list[str]:
    figs = []
    if panels_png is not None:
        figs.append(("panels", "figures/panels.png",
                     f"each declared panel's metric against {TARGET}, one point per variant (mean over its "
                     "finished seeds; error bars: seed sd where a variant has several seeds), annotated with the "
                     "swept value; dashed: ordinary least-squares fit; legend: n, Pearson r and Spearman ρ."))
    figs.append(("profile", "figures/profile.png",
                 "per-variant profile (SSC, LPC, GSQ, eRank/C, PSNR, rFID, gFID): one bar per variant, mean over "
                 "finished seeds, error bars = seed sd (only for variants with several seeds); colour = the "
                 + ("panel the variant belongs to" if panels_png is not None else "tokenizer")
                 + "; n/a = not measured."))
    figs.append(("correlations", "figures/correlations.png",
                 f"correlation of each metric with {TARGET} over seed-averaged variants: Pearson, Spearman and "
                 "Kendall over all variants" + (", then Spearman within each panel" if panels_png is not None
                                                else "") + "; each cell gives the coefficient and n; grey = not "
                 "computable."))
    out = []
    for i, (alt, src, caption) in enumerate(figs, 1):
        out += [f"![{alt}]({src})", "", f"*Figure {i}: {caption}*", ""]
    return out


def write_study_report(results: dict[str, Any], out_dir: str | Path) -> Path:
    """Write report.md, figures/{panels,profile,correlations}.png, correlations.csv/.json; returns report.md."""
    results = _check_results(results)
    out = Path(out_dir)
    table = variant_table(results["runs"])
    rows = correlation_table(results, target=TARGET)
    spread = seed_spread_table(results)
    panels_png = panel_figure(results, out / "figures" / "panels.png")
    profile_figure(results, out / "figures" / "profile.png")
    correlation_heatmap(rows, out / "figures" / "correlations.png")
    write_text(out / "correlations.csv", _csv_rows(rows))
    write_json(out / "correlations.json", rows)

    md = [f"# {_title(results)}", "", _caption(results), "", "## Results", "", _run_table(results["runs"]), "",
          "**Table 1.** One row per run (variant × seed). SSC: normalised mutual information of latent spectral "
          "clusters with true segments; LPC: perceptual change under small latent perturbations; GSQ: 1-NN "
          "accuracy of the latents; eRank/C: effective rank over channels; PSNR in dB; rFID and gFID: FID in the "
          "evaluation recipe's feature space (see the budget note; not comparable with published values); IS, "
          "precision and recall of the DiT's samples. n/a: not measured (failed or pending stage).", ""]
    left = _left_out_md(results["runs"])
    if left:
        md += ["Runs left out of every statistic:", "", *left, ""]
    ci = rows[0]["ci"] if rows else 0.95
    md += ["## Correlation with gFID", "", _correlation_md(rows), "",
           f"**Table 2.** Correlation of each metric with {TARGET} over variants (each variant's done runs averaged "
           "over seeds); subset `all`: every variant with both values, a panel name: only that sweep's variants. "
           f"Brackets: {round(100 * ci)}% paired bootstrap percentile interval (2000 resamples of the "
           f"(metric, {TARGET}) pairs; constant resamples dropped). Expected sign: what the paper's claim implies "
           "(a better metric goes with a lower gFID; for rFID and PSNR this is the naive reading that reconstruction "
           "predicts generation, which the paper argues against); agrees: whether the Spearman sign matches it. With fewer "
           f"than {SMALL_N} variants the percentile bootstrap understates the uncertainty (a perfectly ordered "
           "sweep always gives [1, 1]); read such rows as a direction, not as evidence.", "",
           "## Seed spread", ""]
    md += ([_spread_md(spread), "", "**Table 3.** Spread over seeds of the variants run with more than one "
            "finished seed (sd: sample standard deviation).", ""] if spread else
           ["No variant has more than one finished seed, so the seed-to-seed spread is not measured.", ""])
    md += ["## Figures", "", *_figures_md(results, panels_png),
           "## Wall time per stage", "", _wall_time_md(results), "",
           f"**Table {4 if spread else 3}.** Minutes per stage and run, as each stage took when it was computed "
           "(stages are content-addressed and may be shared with other runs or studies); —: the stage has "
           "not finished; median: the typical cost of one run's stage, robust to stages slowed by other work on the "
           "same machine (the sum of the medians estimates one run that computes every stage).", "",
           "## What the data show", "", *_findings_md(results, rows, spread, table), "",
           "## Reproduce", "", *_commands_md(results), ""]
    path = out / "report.md"
    write_text(path, "\n".join(md))
    return path


__all__ = ["AXIS_LABELS", "correlation_heatmap", "panel_figure", "profile_figure", "seed_spread_table",
           "write_study_report"]
