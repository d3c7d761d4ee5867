"""Profile several tokenizers (or variants of one) side by side: the zoo table and small ablations.

A comparison file (YAML) names variants; each is a registered tokenizer with optional recipe
overrides. For each variant the default checkpoint of that recipe is fetched (trained on first use and
cached under a key that includes the overrides, see :func:`manifold_lab.tokenizers.get_pretrained`),
profiled with ``measure`` and its results folder written to ``<out>/<label>/``. A variant whose
results folder already holds a ``metrics.json`` for the same recipe and measure settings is not
recomputed, so a killed comparison resumes where it stopped. The table and figure are drawn from the
stored results only (:mod:`manifold_lab.reports.compare_report`).

Example (``reports/zoo_geometry/variants.yaml``)::

    title: The tokenizer zoo on the embedded data
    measure: []                      # measure --set overrides shared by all variants
    variants:
      - {label: VAE, tokenizer: vae}
      - {label: PAE w/o SSR, tokenizer: pae, set: [model.ssr_weight=0]}

Controlled studies with gFID (issue 5's ``studies/``) build on the same per-variant records.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from manifold_lab.config import load_config, to_dict
from manifold_lab.errors import ConfigError

_LABEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._+/()-]*$")


@dataclass
class Variant:
    """One column of the comparison: a tokenizer's default recipe plus ``set`` overrides."""

    label: str
    tokenizer: str
    set: list[str] = field(default_factory=list)
    note: str = ""

    def __post_init__(self) -> None:
        if not _LABEL_RE.match(self.label):
            raise ConfigError(f"variant label {self.label!r} must start with a letter or digit and use only "
                              "letters, digits, spaces and ._+/()-")
        self.set = [str(s) for s in self.set]

    @property
    def slug(self) -> str:
        return re.sub(r"[^A-Za-z0-9._-]+", "-", self.label).strip("-").lower()


@dataclass
class CompareConfig:
    """A comparison file: title, caption, shared measure overrides and the variants."""

    title: str = "Tokenizer comparison"
    caption: str = ""
    measure: list[str] = field(default_factory=list)
    baseline: str | None = None  # label of the variant the others are compared against (deltas table)
    variants: list[Variant] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.variants = [v if isinstance(v, Variant) else load_config(Variant, None, (), base=v)
                         for v in self.variants]
        if not self.variants:
            raise ConfigError("a comparison needs at least one variant under 'variants:'")
        slugs = [v.slug for v in self.variants]
        dupes = sorted({s for s in slugs if slugs.count(s) > 1})
        if dupes:
            raise ConfigError(f"variant labels must be unique (after lower-casing): {', '.join(dupes)}")
        if self.baseline is not None and self.baseline not in [v.label for v in self.variants]:
            raise ConfigError(f"baseline {self.baseline!r} is not one of the variant labels: "
                              f"{', '.join(v.label for v in self.variants)}")


def load_comparison(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> CompareConfig:
    return load_config(CompareConfig, path, list(overrides))


def variant_key(variant: Variant, measure_overrides: list[str]) -> str:
    """What a stored result depends on: tokenizer, recipe bytes + overrides (the checkpoint key), measure settings."""
    from manifold_lab.tokenizers import get_spec
    from manifold_lab.tokenizers.pretrained import recipe_key

    spec = get_spec(variant.tokenizer)
    ckpt = recipe_key(variant.tokenizer, spec.default_recipe, variant.set) if spec.default_recipe else "pretrained"
    payload = json.dumps({"tokenizer": variant.tokenizer, "checkpoint": ckpt, "measure": list(measure_overrides)})
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def run_comparison(cfg: CompareConfig, out_dir: str | Path, progress: bool = True,
                   only: list[str] | None = None) -> list[dict[str, Any]]:
    """Train-if-needed and measure every variant (skipping stored ones); returns the per-variant records."""
    from manifold_lab.measure.config import MeasureConfig
    from manifold_lab.measure.pipeline import measure_tokenizer, run_metadata
    from manifold_lab.measure.progress import StageTracker
    from manifold_lab.reports.measure_report import write_results
    from manifold_lab.tokenizers import get_pretrained, get_spec
    from manifold_lab.tokenizers.pretrained import pretrained_dir

    out_dir = Path(out_dir)
    measure_cfg = load_config(MeasureConfig, None, cfg.measure)
    records = []
    for variant in cfg.variants:
        if only and variant.label not in only and variant.slug not in only:
            continue
        key = variant_key(variant, cfg.measure)
        folder = out_dir / variant.slug
        stored = _stored(folder, key)
        if stored is None:
            started = time.perf_counter()
            with StageTracker(enabled=progress) as tracker:
                with tracker.stage(f"{variant.label}: default checkpoint"):
                    t0 = time.perf_counter()
                    tok = get_pretrained(variant.tokenizer, progress=progress, overrides=variant.set)
                    load_s = time.perf_counter() - t0
                result = measure_tokenizer(tok, measure_cfg, tracker)
            subject = {"name": variant.label, "tokenizer": variant.tokenizer, "overrides": variant.set,
                       "checkpoint": (str(pretrained_dir(variant.tokenizer, overrides=variant.set))
                                      if get_spec(variant.tokenizer).default_recipe else "provided by its package"),
                       "latent_shape": list(tok.latent_shape), "variant_key": key,
                       "checkpoint_s": round(load_s, 1)}
            meta = run_metadata(measure_cfg, subject, tracker.timings, started)
            write_results(result, meta, folder)
            stored = _stored(folder, key)
        records.append({"variant": to_dict(variant), "folder": folder.name, **stored})
    return records


def _stored(folder: Path, key: str) -> dict[str, Any] | None:
    file = folder / "metrics.json"
    if not file.is_file():
        return None
    try:
        data = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if data.get("meta", {}).get("subject", {}).get("variant_key") != key:
        return None  # recipe, overrides or measure settings changed: recompute
    return {"summary": data["summary"], "metrics": data["metrics"], "meta": data["meta"]}


def load_records(cfg: CompareConfig, out_dir: str | Path) -> list[dict[str, Any]]:
    """The stored records of every variant (for reports; nothing is computed)."""
    out_dir = Path(out_dir)
    records, missing = [], []
    for variant in cfg.variants:
        stored = _stored(out_dir / variant.slug, variant_key(variant, cfg.measure))
        if stored is None:
            missing.append(variant.label)
        else:
            records.append({"variant": to_dict(variant), "folder": variant.slug, **stored})
    if missing:
        raise ConfigError(f"no stored results for {', '.join(missing)} in {out_dir}; run `manifold-lab compare` first")
    return records
