"""The results folder of ``measure``: metrics.json, report.md and figures, written all-or-nothing.

The folder is assembled under a temporary name and renamed into place only when every file is
written (``manifold_lab.io.atomic_dir``), so a failed run never leaves a half-written folder that
looks complete.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from manifold_lab.io import atomic_dir, write_json, write_text
from manifold_lab.measure.pipeline import MeasureResult, summary_row
from manifold_lab.reports import figures

# metric -> (direction, one-line meaning) for tables and captions
METRIC_NOTES = {
    "SSC": ("higher", "spatial structure coherence: NMI of latent spectral clusters vs. true segments"),
    "LPC": ("lower", "local perceptual continuity: perceptual change under latent perturbation"),
    "GSQ": ("higher", "global semantic quality: leave-one-out 1-NN accuracy of pooled latents"),
    "eRank": ("diagnostic", "effective rank of pooled latents"),
    "eRank/C": ("diagnostic", "effective rank divided by the channel count"),
    "PSNR": ("higher", "reconstruction PSNR (dB)"),
    "SSIM": ("higher", "reconstruction SSIM"),
    "perceptual": ("lower", "reconstruction perceptual distance"),
    "rFID": ("lower", "reconstruction FID"),
}


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 1e4 else f"{v:.0f}"
    return str(v)


def print_summary(metrics: dict[str, Any], title: str, console: Console | None = None) -> None:
    console = console or Console()
    table = Table(title=title, show_lines=False)
    table.add_column("metric", style="bold")
    table.add_column("value", justify="right")
    table.add_column("better")
    table.add_column("what it is")
    for name, value in summary_row(metrics).items():
        direction, note = METRIC_NOTES[name]
        table.add_row(name, _fmt(value), direction, note)
    console.print(table)
    for section in ("ssc", "lpc", "gsq", "reconstruction", "probes"):
        node = metrics.get(section)
        if isinstance(node, dict) and "skipped" in node:
            console.print(f"[yellow]{section} skipped:[/] {node['skipped']}")


def write_results(result: MeasureResult, meta: dict[str, Any], out_dir: str | Path) -> Path:
    """Write metrics.json, figures/*.png and report.md into ``out_dir`` atomically."""
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        figs = _write_figures(result, tmp / "figures")
        payload = {"summary": summary_row(result.metrics), "metrics": result.metrics, "meta": meta,
                   "figures": {k: f"figures/{v.name}" for k, v in figs.items()}}
        write_json(tmp / "metrics.json", payload)
        write_text(tmp / "report.md", _markdown(result.metrics, meta, figs))
    return out_dir


def _write_figures(result: MeasureResult, fig_dir: Path) -> dict[str, Path]:
    m, a = result.metrics, result.artifacts
    fig_dir.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}
    names = a.get("class_names")
    for method, label in (("tsne", "t-SNE"), ("umap", "UMAP")):
        emb = a.get("maps", {}).get(method)
        if emb is not None:
            pr = m["probes"][method]
            title = (f"{label} of pooled latents (n = {len(emb)}): "
                     f"kNN acc. {pr['knn_accuracy']:.3f}, silhouette {pr['silhouette']:.3f}")
            out[method] = figures.embedding_map(emb, a["map_labels"], names, title, label, fig_dir / f"{method}.png")
    lpc = m.get("lpc", {})
    if "per_rho" in lpc:
        out["lpc"] = figures.lpc_curve(lpc["per_rho"], lpc["lpc"], lpc.get("perceptual_distance", "?"),
                                       fig_dir / "lpc_vs_rho.png")
    ex = a.get("ssc_examples")
    if ex is not None:
        out["ssc"] = figures.ssc_examples(ex["images"], ex["segments"], ex["clusters"], ex["nmi"],
                                          fig_dir / "ssc_examples.png")
    st = m.get("latent_stats", {})
    if "mean" in st and "std" in st:
        dead_ids = set(st.get("dead_channels") or [])
        out["channels"] = figures.channel_stats(st["mean"], st["std"], fig_dir / "channel_stats.png",
                                                dead=[i in dead_ids for i in range(len(st["mean"]))])
    rec = a.get("recon_examples")
    if rec is not None:
        out["recon"] = figures.recon_grid(rec[0], rec[1], fig_dir / "reconstructions.png")
    return out


def _markdown(m: dict[str, Any], meta: dict[str, Any], figs: dict[str, Path]) -> str:
    subj = meta["subject"]
    cfg = meta["config"]
    lines = [f"# Latent-space profile: {subj.get('name', '?')}", ""]
    lines += [f"Subject: {', '.join(f'{k} = `{v}`' for k, v in subj.items())}.  ",
              f"Data: `{cfg['dataset']}` ({cfg['split']} split), seed {meta['seed']}, device `{meta['device']}`, "
              f"manifold-lab {meta['versions']['manifold-lab']}, torch {meta['versions']['torch']}.", ""]
    lines += ["## Summary", "", "| metric | value | better | definition |", "|---|---|---|---|"]
    for name, value in summary_row(m).items():
        direction, note = METRIC_NOTES[name]
        lines.append(f"| {name} | {_fmt(value)} | {direction} | {note} |")
    lines.append("")
    lines += _details(m)
    captions = {
        "recon": "Reconstructions: inputs (top) and decoded latents (bottom).",
        "tsne": "t-SNE map of globally pooled latents, coloured by class; tight, separated clusters mean "
                "semantic information survives pooling (compare GSQ).",
        "umap": "UMAP map of the same pooled latents, coloured by class.",
        "lpc": "LPC: perceptual distance between the decoded anchor and the decoded latent perturbed by "
               r"$\epsilon=\rho\|z\|$ along random unit directions, per scale (dots) and the 1/ρ-weighted sum "
               "(dashed). Lower means a smoother decoder manifold.",
        "ssc": "SSC examples: input scene, ground-truth segments downsampled to the latent grid by majority vote, "
               "and the normalised spectral clusters of the L2-normalised latent tokens (k = number of true "
               "segments), with each image's NMI.",
        "channels": "Per-channel latent mean (bars) with ± one standard deviation (whiskers) over every "
                    "latent position of the measured images; red bars mark near-dead channels.",
    }
    if figs:
        lines += ["## Figures", ""]
        for i, (key, path) in enumerate(figs.items(), 1):
            lines += [f"![{key}](figures/{path.name})", "", f"*Figure {i}.* {captions.get(key, '')}", ""]
    lines += ["## Wall time per stage", "", "| stage | seconds |", "|---|---|"]
    for stage, sec in meta.get("timing_s", {}).items():
        lines.append(f"| {stage} | {sec:.1f} |")
    lines.append(f"| **total** | {meta.get('wall_time_s', 0):.1f} |")
    lines += ["", "Every parameter, package version and the encoder, distance and FID backbone used are in "
              "`metrics.json`.", ""]
    return "\n".join(lines)


def _details(m: dict[str, Any]) -> list[str]:
    out = ["## Details", ""]
    ssc = m.get("ssc", {})
    if "mean" in ssc:
        out.append(f"- **SSC** {_fmt(ssc['mean'])} ± {_fmt(ssc.get('std'))} over {ssc.get('n_images')} images "
                   f"with ≥ 2 segments (σ = {ssc.get('sigma')}, k-means restarts {ssc.get('n_init')}, "
                   f"latent grid {ssc.get('grid')}, source: {ssc.get('source')}).")
        for name, ref in ssc.get("references", {}).items():
            out.append(f"  - reference map `{name}` (grid {ref.get('grid')}): SSC {_fmt(ref.get('mean'))} ± "
                       f"{_fmt(ref.get('std'))} on the same scenes (a map the tokenizer is built on or "
                       "aligned to: a regulariser towards it moves the latent's SSC towards this value).")
    elif "skipped" in ssc:
        out.append(f"- **SSC** skipped: {ssc['skipped']}.")
    lpc = m.get("lpc", {})
    if "lpc" in lpc:
        per = ", ".join(f"ρ={float(k):g}: {_fmt(v)}" for k, v in lpc["per_rho"].items())
        out.append(f"- **LPC** {_fmt(lpc['lpc'])} (weights ∝ 1/ρ; {per}); {lpc.get('n_images')} images × "
                   f"{lpc.get('n_directions')} direction(s), distance `{lpc.get('perceptual_distance')}`.")
        pl = lpc.get("path_lipschitz")
        if pl:
            out.append(f"- **Path Lipschitz probe** {_fmt(pl['mean'])} ± {_fmt(pl['std'])} perceptual change per "
                       f"unit latent step ({pl['n_pairs']} pairs, {pl['steps']} steps).")
    elif "skipped" in lpc:
        out.append(f"- **LPC** skipped: {lpc['skipped']}.")
    gsq = m.get("gsq", {})
    if "mean" in gsq:
        out.append(f"- **GSQ** {_fmt(gsq['mean'])} ± {_fmt(gsq.get('std'))} ({gsq.get('repeats')} repeats, "
                   f"{gsq.get('num_classes') or gsq.get('classes_available')} classes × "
                   f"{gsq.get('per_class') or 'all'} images per repeat).")
    er = m.get("erank", {})
    st = m.get("latent_stats", {})
    if "global_std" in st:
        out.append(f"- **Latent statistics** global mean {_fmt(st['global_mean'])}, std {_fmt(st['global_std'])}; "
                   f"{len(st.get('dead_channels') or [])} near-dead channel(s) ({st.get('dead_rule')}).")
    if "erank" in er:
        out.append(f"- **eRank** {_fmt(er['erank'])} of {er.get('channels')} channels "
                   f"(normalised {_fmt(er.get('erank_normalized'))}; {er.get('n')} pooled latents).")
    rec = m.get("reconstruction", {})
    if "psnr" in rec:
        out.append(f"- **Reconstruction** on {rec.get('n_images')} images: PSNR {_fmt(rec['psnr'])} dB, "
                   f"SSIM {_fmt(rec.get('ssim'))}, perceptual distance {_fmt(rec.get('perceptual'))} "
                   f"(`{rec.get('perceptual_distance')}`), rFID {_fmt(rec.get('rfid'))} in the feature space of "
                   f"`{rec.get('fid_backbone')}` (sqrtm: {rec.get('rfid_sqrtm_method')}).")
    elif "skipped" in rec:
        out.append(f"- **Reconstruction** skipped: {rec['skipped']}.")
    pr = m.get("probes", {})
    if "linear_probe" in pr:
        out.append(f"- **Linear probe** accuracy {_fmt(pr['linear_probe'].get('accuracy'))} on pooled latents.")
    out.append("")
    return out
