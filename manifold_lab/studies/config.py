"""A study file (``studies/*.yaml``) as typed dataclasses: variants, stages, budgets, seeds, panels.

A study crosses named **variants** (a registered tokenizer plus recipe overrides) with **seeds** and
runs a fixed chain of **stages** on each (see :mod:`manifold_lab.studies.stages`). A **budget** names
the overrides that size every stage (``cpu`` for the real run, ``smoke`` for the test suite); the
variants stay the same across budgets, so a smoke run exercises exactly the study that the CPU run
measures. Example::

    name: pilot
    title: Geometry vs gFID under controlled tokenizer variants
    default_budget: cpu
    stages: [tokenizer, measure, cache_latents, train_dit, sample, evaluate]
    seeds: [0]
    budgets:
      cpu:
        gfid: cpu                             # base recipe of the gFID chain (a built-in budget or a file)
        gfid_set: [train.steps=300]           # overrides of that recipe
        measure_set: [num_images=1000]        # overrides of MeasureConfig
        tokenizer_set:                        # per-tokenizer recipe overrides ("*" = every tokenizer)
          pae: [train.steps=300]
    panels:
      - {name: width, title: "(a) bottleneck width", metric: rFID, x_label: "latent channels C"}
    variants:
      - {label: VAE C=4, tokenizer: vae, set: [model.z_channels=4], panels: [width], x: 4}
      - {label: PAE plain, tokenizer: pae, set: [model.ssr_weight=0], seeds: [0, 1, 2]}

A variant's seed drives every stage that draws random numbers (tokenizer and DiT initialisation and
batches, sampling noise, measurement subsets), so repeating a variant over seeds measures the whole
chain's seed-to-seed spread.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from manifold_lab.config import apply_overrides, from_dict, read_yaml
from manifold_lab.errors import ConfigError

#: The stages of one run, in execution order, and the stages each one needs.
STAGES: dict[str, tuple[str, ...]] = {
    "tokenizer": (),
    "measure": ("tokenizer",),
    "cache_latents": ("tokenizer",),
    "train_dit": ("cache_latents",),
    "sample": ("train_dit",),
    "evaluate": ("sample",),
}

#: Headline numbers a panel may put on its x axis (the measure summary and the reconstruction columns).
PANEL_METRICS = ("SSC", "LPC", "GSQ", "eRank", "eRank/C", "PSNR", "SSIM", "perceptual", "rFID")

_LABEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._+=/()-]*$")
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]*$")


@dataclass
class Budget:
    """How big every stage is: the gFID recipe, measure settings and per-tokenizer recipe overrides."""

    gfid: str = "cpu"                         # built-in gFID budget (cpu | smoke | imagenet256) or a YAML path
    gfid_set: list[str] = field(default_factory=list)
    measure_set: list[str] = field(default_factory=list)
    tokenizer_set: dict[str, list[str]] = field(default_factory=dict)  # tokenizer name or "*" -> overrides
    note: str = ""                            # what this budget is for, how long it takes (shown in reports)

    def tokenizer_overrides(self, tokenizer: str) -> list[str]:
        return [*self.tokenizer_set.get("*", []), *self.tokenizer_set.get(tokenizer, [])]


@dataclass
class Panel:
    """One Fig. 2-style panel: the variants of one controlled sweep, ``metric`` against gFID."""

    name: str
    title: str = ""
    metric: str = "rFID"
    x_label: str = ""                         # what the sweep varies (annotates the points), e.g. "SSR weight"

    def __post_init__(self) -> None:
        if not _NAME_RE.match(self.name):
            raise ConfigError(f"panel name {self.name!r} must be lower-case letters, digits, '-' or '_'")
        if self.metric not in PANEL_METRICS:
            raise ConfigError(f"panel {self.name}: metric must be one of {', '.join(PANEL_METRICS)}, "
                              f"got {self.metric!r}")


@dataclass
class StudyVariant:
    """A tokenizer and its recipe overrides; ``seeds`` (default: the study's) repeat it."""

    label: str
    tokenizer: str
    set: list[str] = field(default_factory=list)
    panels: list[str] = field(default_factory=list)
    x: float | None = None                    # the swept value (plotted as the point's annotation)
    seeds: list[int] | None = None
    note: str = ""

    def __post_init__(self) -> None:
        if not _LABEL_RE.match(self.label):
            raise ConfigError(f"variant label {self.label!r} must start with a letter or digit and use only "
                              "letters, digits, spaces and ._+=/()-")
        self.set = [str(s) for s in self.set]

    @property
    def slug(self) -> str:
        return re.sub(r"[^A-Za-z0-9._-]+", "-", self.label.replace("=", "")).strip("-").lower()


@dataclass
class ExecutorConfig:
    """Where the runs execute (see :mod:`manifold_lab.studies.executors`)."""

    kind: str = "local"                       # local | torchrun | submitit
    workers: int = 1                          # local: runs in parallel processes on this machine
    nproc_per_node: int = 1                   # torchrun: processes (GPUs) per stage
    cluster: str = "slurm"                    # submitit: slurm | local | debug
    folder: str | None = None                 # submitit: job logs (default <work>/submitit)
    partition: str | None = None
    timeout_min: int = 240
    gpus_per_node: int = 0
    cpus_per_task: int = 2
    max_parallel: int = 16                    # submitit: array jobs running at once

    def __post_init__(self) -> None:
        if self.kind not in ("local", "torchrun", "submitit"):
            raise ConfigError(f"executor.kind must be local, torchrun or submitit, got {self.kind!r}")
        if self.workers < 1 or self.nproc_per_node < 1:
            raise ConfigError("executor.workers and executor.nproc_per_node must be >= 1")
        if self.cluster not in ("slurm", "local", "debug"):
            raise ConfigError(f"executor.cluster must be slurm, local or debug, got {self.cluster!r}")


@dataclass
class StudyConfig:
    """A whole study file (module docstring)."""

    name: str
    title: str = ""
    caption: str = ""
    default_budget: str = "cpu"
    stages: list[str] = field(default_factory=lambda: list(STAGES))
    seeds: list[int] = field(default_factory=lambda: [0])
    budgets: dict[str, Budget] = field(default_factory=dict)
    panels: list[Panel] = field(default_factory=list)
    variants: list[StudyVariant] = field(default_factory=list)
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)

    def __post_init__(self) -> None:
        if not _NAME_RE.match(self.name):
            raise ConfigError(f"study name {self.name!r} must be lower-case letters, digits, '-' or '_'")
        unknown = [s for s in self.stages if s not in STAGES]
        if unknown:
            raise ConfigError(f"unknown stage(s) {', '.join(unknown)}; valid stages: {', '.join(STAGES)}")
        self.stages = needed_stages(self.stages)
        if not self.variants:
            raise ConfigError(f"study {self.name} needs at least one variant under 'variants:'")
        if not self.budgets:
            raise ConfigError(f"study {self.name} needs at least one budget under 'budgets:' (e.g. cpu, smoke)")
        if self.default_budget not in self.budgets:
            raise ConfigError(f"default_budget {self.default_budget!r} is not one of the budgets: "
                              f"{', '.join(self.budgets)}")
        if not self.seeds:
            raise ConfigError("seeds must list at least one seed")
        slugs = [v.slug for v in self.variants]
        dupes = sorted({s for s in slugs if slugs.count(s) > 1})
        if dupes:
            raise ConfigError(f"variant labels must be unique (after lower-casing): {', '.join(dupes)}")
        panel_names = [p.name for p in self.panels]
        for v in self.variants:
            missing = [p for p in v.panels if p not in panel_names]
            if missing:
                raise ConfigError(f"variant {v.label!r} names unknown panel(s) {', '.join(missing)}; panels: "
                                  f"{', '.join(panel_names) or '(none declared)'}")

    def budget(self, name: str | None) -> Budget:
        name = name or self.default_budget
        if name not in self.budgets:
            raise ConfigError(f"study {self.name} has no budget {name!r}; its budgets: {', '.join(self.budgets)}")
        return self.budgets[name]

    def runs(self, only: Sequence[str] | None = None) -> list["RunSpec"]:
        """Every (variant, seed) pair, optionally only the variants whose label or slug is in ``only``."""
        if only:
            known = {v.label for v in self.variants} | {v.slug for v in self.variants}
            missing = [o for o in only if o not in known]
            if missing:
                raise ConfigError(f"--only names unknown variant(s) {', '.join(missing)}; variants: "
                                  f"{', '.join(v.label for v in self.variants)}")
        out = []
        for v in self.variants:
            if only and v.label not in only and v.slug not in only:
                continue
            for seed in (v.seeds if v.seeds is not None else self.seeds):
                out.append(RunSpec(variant=v, seed=int(seed)))
        return out


@dataclass(frozen=True)
class RunSpec:
    """One variant at one seed: the unit the executors schedule."""

    variant: StudyVariant
    seed: int

    @property
    def run_id(self) -> str:
        return f"{self.variant.slug}-s{self.seed}"


def needed_stages(stages: Sequence[str]) -> list[str]:
    """``stages`` plus every stage they need, in execution order."""
    want: set[str] = set()

    def add(stage: str) -> None:
        if stage not in want:
            want.add(stage)
            for dep in STAGES[stage]:
                add(dep)

    for s in stages:
        add(s)
    return [s for s in STAGES if s in want]


def load_study(path: str | Path, overrides: Sequence[str] = ()) -> StudyConfig:
    """Read and validate a study file; ``overrides`` are ``key=value`` strings (``executor.workers=2``)."""
    path = Path(path)
    data = apply_overrides(read_yaml(path), list(overrides))
    return from_dict(StudyConfig, data, where="")


def find_study(name_or_path: str, studies_dir: str | Path = "studies") -> Path:
    """A study file from its path or its name (``pilot`` -> ``studies/pilot.yaml``)."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml"):
        if not p.is_file():
            raise ConfigError(f"study file not found: {p}")
        return p
    cand = Path(studies_dir) / f"{name_or_path}.yaml"
    if not cand.is_file():
        raise ConfigError(f"no study named {name_or_path!r}: {cand} does not exist; pass a study YAML file")
    return cand


__all__ = ["Budget", "ExecutorConfig", "PANEL_METRICS", "Panel", "RunSpec", "STAGES", "StudyConfig",
           "StudyVariant", "find_study", "load_study", "needed_stages"]
