"""Tables and the side-by-side figure of a comparison (zoo, ablation), drawn from stored results only.

``write_comparison_report(cfg, records, out_dir)`` writes ``report.md`` (captioned table, deltas
against the baseline when one is named, the figure, the command that regenerates everything),
``results.csv`` (one row per variant) and ``results.json``; the figure is ``profile.png``.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from manifold_lab.io import write_json, write_text  # noqa: E402
from manifold_lab.reports.figures import _save  # noqa: E402

#: (column, metrics path for the value, path for the spread or None, better direction, axis label)
COLUMNS: list[tuple[str, tuple[str, ...], tuple[str, ...] | None, str, str]] = [
    ("PSNR", ("reconstruction", "psnr"), None, "higher", "PSNR (dB)"),
    ("rFID", ("reconstruction", "rfid"), None, "lower", "rFID"),
    ("SSC", ("ssc", "mean"), ("ssc", "std"), "higher", "SSC (NMI)"),
    ("LPC", ("lpc", "lpc"), None, "lower", "LPC (perceptual distance)"),
    ("GSQ", ("gsq", "mean"), ("gsq", "std"), "higher", "GSQ (1-NN accuracy)"),
    ("eRank/C", ("erank", "erank_normalized"), None, "diagnostic", "eRank / C"),
]


def _get(node: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One flat row per variant: label, tokenizer, overrides, latent shape and every headline metric."""
    out = []
    for rec in records:
        m, subject = rec["metrics"], rec["meta"]["subject"]
        row: dict[str, Any] = {"label": rec["variant"]["label"], "tokenizer": rec["variant"]["tokenizer"],
                               "overrides": " ".join(rec["variant"]["set"]),
                               "latent": "x".join(str(d) for d in subject.get("latent_shape", []))}
        for name, path, spread, _, _ in COLUMNS:
            row[name] = _get(m, path)
            if spread is not None:
                row[name + "_std"] = _get(m, spread)
        row["eRank"] = _get(m, ("erank", "erank"))
        row["SSIM"] = _get(m, ("reconstruction", "ssim"))
        row["measure_s"] = rec["meta"].get("wall_time_s")
        out.append(row)
    return out


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}f}" if abs(v) < 100 else f"{v:.1f}"
    return str(v)


def profile_figure(table: list[dict[str, Any]], title: str, path: Path) -> Path:
    """Six panels (PSNR, rFID, SSC, LPC, GSQ, eRank/C), one bar per variant; error bars = std where defined."""
    labels = [r["label"] for r in table]
    fig, axes = plt.subplots(2, 3, figsize=(12, 6.4))
    colours = [plt.get_cmap("tab10")(i % 10) for i in range(len(labels))]
    x = np.arange(len(labels))
    for ax, (name, _, spread, better, axis_label) in zip(axes.flat, COLUMNS):
        vals = np.array([np.nan if r[name] is None else float(r[name]) for r in table])
        err = None
        if spread is not None:
            err = np.array([0.0 if r.get(name + "_std") is None else float(r[name + "_std"]) for r in table])
        ax.bar(x, vals, yerr=err, color=colours, capsize=3, edgecolor="black", linewidth=0.5)
        arrow = {"higher": " (higher is better)", "lower": " (lower is better)"}.get(better, " (diagnostic)")
        ax.set_title(name + arrow, fontsize=9)
        ax.set_ylabel(axis_label, fontsize=8)
        ax.set_xticks(x, labels, rotation=30, ha="right", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    handles = [matplotlib.patches.Patch(color=c, label=lbl) for c, lbl in zip(colours, labels)]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(labels), 6), fontsize=8, frameon=False,
               title="variant", title_fontsize=8, bbox_to_anchor=(0.5, -0.04))
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0.05, 1, 0.97))
    return _save(fig, path)


def _markdown_table(table: list[dict[str, Any]]) -> str:
    head = ["variant", "tokenizer", "latent (C x h x w)", "PSNR (dB)", "SSIM", "rFID", "SSC", "LPC", "GSQ",
            "eRank", "eRank/C"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table:
        ssc = _fmt(r["SSC"]) + (f" ± {_fmt(r['SSC_std'])}" if r.get("SSC_std") is not None else "")
        gsq = _fmt(r["GSQ"]) + (f" ± {_fmt(r['GSQ_std'])}" if r.get("GSQ_std") is not None else "")
        lines.append("| " + " | ".join([r["label"], r["tokenizer"], r["latent"], _fmt(r["PSNR"], 2), _fmt(r["SSIM"]),
                                         _fmt(r["rFID"], 1), ssc, _fmt(r["LPC"]), gsq, _fmt(r["eRank"], 2),
                                         _fmt(r["eRank/C"])]) + " |")
    return "\n".join(lines)


def _delta_table(table: list[dict[str, Any]], baseline: str) -> str:
    base = next(r for r in table if r["label"] == baseline)
    metrics = [(name, better) for name, _, _, better, _ in COLUMNS if better != "diagnostic"]
    head = ["variant", "overrides"] + [f"Δ{n} ({'↑' if b == 'higher' else '↓'})" for n, b in metrics]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table:
        if r["label"] == baseline:
            continue
        cells = [r["label"], f"`{r['overrides']}`" if r["overrides"] else ""]
        for name, better in metrics:
            if r[name] is None or base[name] is None:
                cells.append("n/a")
                continue
            d = float(r[name]) - float(base[name])
            good = d > 0 if better == "higher" else d < 0
            cells.append(f"{d:+.3f} {'better' if good else 'worse'}" if d != 0 else "0")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_comparison_report(cfg: Any, records: list[dict[str, Any]], out_dir: str | Path, command: str) -> Path:
    """Write report.md, results.csv, results.json and profile.png into ``out_dir``."""
    out_dir = Path(out_dir)
    table = rows(records)
    profile_figure(table, cfg.title, out_dir / "profile.png")
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(table[0].keys()))
    writer.writeheader()
    writer.writerows(table)
    write_text(out_dir / "results.csv", buf.getvalue())
    write_json(out_dir / "results.json", {"title": cfg.title, "rows": table,
                                          "variants": [r["variant"] for r in records]})
    first = records[0]["metrics"]
    distance = _get(first, ("lpc", "distance")) or _get(first, ("reconstruction", "perceptual_distance"))
    fid_net = _get(first, ("reconstruction", "fid_backbone"))
    md = [f"# {cfg.title}", ""]
    if cfg.caption:
        md += [cfg.caption, ""]
    md += [f"Regenerate: `{command}` (stored variants are reused; delete a variant's folder to recompute it).", "",
           "## Results", "", _markdown_table(table), "",
           "**Table 1.** Reconstruction and latent-geometry profile of each variant's default checkpoint on the "
           "embedded data (Fashion-MNIST test split; SSC on Fashion-Scenes instance masks). SSC: mean ± std over "
           "scenes; GSQ: mean ± std over protocol repeats; LPC and perceptual distances measured with "
           f"`{distance}`; rFID in the `{fid_net}` feature space (not Inception: not comparable with paper "
           "values). Each variant's own folder holds its full report (`<variant>/report.md`).", ""]
    if cfg.baseline:
        md += ["## Against the baseline", "", _delta_table(table, cfg.baseline), "",
               f"**Table 2.** Change of each metric relative to `{cfg.baseline}`; arrows give the better direction.",
               ""]
    md += ["## Figure", "", "![profile](profile.png)", "",
           "**Figure 1.** One bar per variant for PSNR, rFID, SSC, LPC, GSQ and eRank/C (error bars: the std "
           "over scenes for SSC and over protocol repeats for GSQ; none where a single number is measured).", ""]
    write_text(out_dir / "report.md", "\n".join(md))
    return out_dir
