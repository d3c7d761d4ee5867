"""The stage graph of one study run, with content-addressed, resumable outputs.

A run (one variant at one seed) is the chain::

    tokenizer ──> measure
        └──────> cache_latents ──> train_dit ──> sample ──> evaluate

Every stage's output lives in ``<work>/stages/<stage>/<key>/`` where ``key`` hashes the stage's own
settings and the keys of the stages it reads (so it is known before anything runs, and ``status``
can answer without loading a model). A stage is done when its ``stage.json`` exists: that file is
written last, atomically, with the stage's settings, inputs, result summary and wall time. Hence:

* rerunning a study does only the stages whose ``stage.json`` is missing; two variants (or two
  studies sharing a work folder) that need the same stage with the same settings share one output;
* a killed stage resumes from what it left (tokenizer and DiT training from their last engine
  checkpoint, latent caching from its finished shards, sampling from its finished chunks);
* changing a setting changes the key, so a stale output is never reused. Code changes do not
  change keys: delete ``<work>/stages/<stage>/`` to recompute a stage after changing its code.

A lock file per stage key keeps parallel workers from computing the same stage twice.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from manifold_lab import distributed
from manifold_lab.config import to_dict
from manifold_lab.errors import ManifoldLabError
from manifold_lab.io import exclusive_lock, write_json
from manifold_lab.studies.config import STAGES, Budget, RunSpec, StudyConfig

STAGE_FILE = "stage.json"
KEY_FORMAT = 1  # bump when the meaning of a stage's output changes, to invalidate every stored output


@dataclass
class RunContext:
    """Everything a stage of one run needs: the study, the budget, the run and the work folder."""

    study: StudyConfig
    budget_name: str
    run: RunSpec
    work: Path
    progress: bool = False
    _tokenizer: Any = field(default=None, repr=False)
    _keys: dict[str, str] = field(default_factory=dict, repr=False)

    @property
    def budget(self) -> Budget:
        return self.study.budget(self.budget_name)

    # -- settings of each stage ---------------------------------------------------------------
    def tokenizer_overrides(self) -> list[str]:
        v = self.run.variant
        return [*self.budget.tokenizer_overrides(v.tokenizer), *v.set, f"train.seed={self.run.seed}"]

    def gfid_recipe(self) -> Any:
        from manifold_lab.diffusion.config import BUDGETS, load_gfid_recipe

        b = self.budget
        seeds = [f"train.seed={self.run.seed}", f"sample.seed={self.run.seed}"]
        if b.gfid in BUDGETS:
            return load_gfid_recipe(None, [*b.gfid_set, *seeds], budget=b.gfid)
        return load_gfid_recipe(b.gfid, [*b.gfid_set, *seeds])

    def measure_config(self) -> Any:
        from manifold_lab.config import load_config
        from manifold_lab.measure.config import MeasureConfig

        return load_config(MeasureConfig, None, [*self.budget.measure_set, f"seed={self.run.seed}"])

    # -- keys and folders -----------------------------------------------------------------------
    def key(self, stage: str) -> str:
        if stage not in self._keys:
            payload = {"stage": stage, "format": KEY_FORMAT, "config": stage_config(self, stage),
                       "inputs": {dep: self.key(dep) for dep in STAGES[stage]}}
            text = json.dumps(payload, sort_keys=True, default=str)
            self._keys[stage] = hashlib.sha256(text.encode()).hexdigest()[:12]
        return self._keys[stage]

    def folder(self, stage: str) -> Path:
        return self.work / "stages" / stage / self.key(stage)

    def record(self, stage: str) -> dict[str, Any] | None:
        """The stored ``stage.json`` of ``stage`` for this run, or None while it is not done."""
        return read_stage_record(self.folder(stage))

    # -- the tokenizer (loaded once per run, only when a stage needs it) -------------------------
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            from manifold_lab.tokenizers import get_spec, load_tokenizer
            from manifold_lab.train.device import resolve_device

            if _uses_package_weights(self):
                tok = get_spec(self.run.variant.tokenizer).pretrained()
            else:
                folder = self.folder("tokenizer") / "tokenizer"
                if not (folder / "config.json").is_file():
                    raise ManifoldLabError(f"the tokenizer stage of {self.run.run_id} has no output in {folder}; "
                                           "run the study again to train it")
                tok = load_tokenizer(folder)
            self._tokenizer = tok.to(resolve_device("auto")).eval()
        return self._tokenizer


def _uses_package_weights(ctx: RunContext) -> bool:
    """A tokenizer whose package brings its own weights and that the variant does not retrain."""
    from manifold_lab.tokenizers import get_spec

    spec = get_spec(ctx.run.variant.tokenizer)
    return spec.pretrained is not None and (spec.default_recipe is None or not ctx.run.variant.set)


def stage_config(ctx: RunContext, stage: str) -> dict[str, Any]:
    """The settings an output of ``stage`` depends on (besides its inputs' keys)."""
    if stage == "tokenizer":
        from manifold_lab.tokenizers import get_spec

        name = ctx.run.variant.tokenizer
        if _uses_package_weights(ctx):
            return {"tokenizer": name, "weights": "provided by its package"}
        spec = get_spec(name)
        if spec.default_recipe is None:
            raise ManifoldLabError(f"tokenizer '{name}' has neither package weights nor a default recipe; "
                                   "register one with default_recipe= to use it in a study")
        recipe = Path(spec.default_recipe)
        return {"tokenizer": name, "recipe": recipe.name,
                "recipe_sha256": hashlib.sha256(recipe.read_bytes()).hexdigest()[:16],
                "overrides": ctx.tokenizer_overrides()}
    if stage == "measure":
        return to_dict(ctx.measure_config())
    recipe = ctx.gfid_recipe()
    if stage == "cache_latents":
        return to_dict(recipe.data)
    if stage == "train_dit":
        train = to_dict(recipe.train)
        for cosmetic in ("tensorboard", "log_every", "ckpt_every"):  # do not change the weights
            train.pop(cosmetic, None)
        return {"model": to_dict(recipe.model), "transport": to_dict(recipe.transport), "train": train}
    if stage == "sample":
        return to_dict(recipe.sample)
    if stage == "evaluate":
        return to_dict(recipe.eval)
    raise ManifoldLabError(f"unknown stage {stage!r}; valid stages: {', '.join(STAGES)}")


def read_stage_record(folder: Path) -> dict[str, Any] | None:
    path = folder / STAGE_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None  # a damaged record counts as not done: the stage is recomputed


# ---------------------------------------------------------------------------------------------
# the stages


def _run_tokenizer(ctx: RunContext, folder: Path) -> dict[str, Any]:
    from manifold_lab.diffusion.latent_cache import tokenizer_fingerprint
    from manifold_lab.tokenizers import get_spec
    from manifold_lab.tokenizers.training import train_tokenizer

    name = ctx.run.variant.tokenizer
    if not _uses_package_weights(ctx):
        spec = get_spec(name)
        save = folder / "tokenizer"
        if not (save / "config.json").is_file():
            train_tokenizer(name, spec.default_recipe, ctx.tokenizer_overrides(), run_dir=folder / "run",
                            progress=ctx.progress, save_dir=save)
    tok = ctx.tokenizer()
    return {"tokenizer": name, "latent_shape": list(tok.latent_shape), "fingerprint": tokenizer_fingerprint(tok),
            "params": int(sum(p.numel() for p in tok.parameters()))}


def _run_measure(ctx: RunContext, folder: Path) -> dict[str, Any]:
    from manifold_lab.measure.pipeline import measure_tokenizer, run_metadata, summary_row
    from manifold_lab.measure.progress import StageTracker
    from manifold_lab.reports.measure_report import write_results

    cfg = ctx.measure_config()
    tok = ctx.tokenizer()
    started = time.perf_counter()
    with StageTracker(enabled=ctx.progress and distributed.is_main_process()) as tracker:
        result = measure_tokenizer(tok, cfg, tracker)  # every rank measures a shard; rank 0 holds the result
    if not distributed.is_main_process():
        return {}
    subject = {"name": ctx.run.variant.label, "tokenizer": ctx.run.variant.tokenizer,
               "overrides": ctx.run.variant.set, "seed": ctx.run.seed, "latent_shape": list(tok.latent_shape),
               "checkpoint": str(ctx.folder("tokenizer"))}
    write_results(result, run_metadata(cfg, subject, tracker.timings, started), folder / "measure")
    m = result.metrics
    summary = {**summary_row(m), "SSC_std": (m.get("ssc") or {}).get("std"), "GSQ_std": (m.get("gsq") or {}).get("std")}
    return {"summary": summary, "metrics_file": "measure/metrics.json"}


def _run_cache(ctx: RunContext, folder: Path) -> dict[str, Any]:
    from manifold_lab.diffusion.gfid import build_latent_cache
    from manifold_lab.diffusion.latent_cache import LatentCache

    build_latent_cache(ctx.tokenizer(), ctx.gfid_recipe(), out=folder / "latents")
    cache = LatentCache(folder / "latents")
    return {"num_items": cache.num_items, "latent_shape": list(cache.latent_shape)}


def _run_train_dit(ctx: RunContext, folder: Path) -> dict[str, Any]:
    from manifold_lab.diffusion.train_dit import train_dit

    recipe = ctx.gfid_recipe()
    dit_dir = folder / "dit"
    if not (dit_dir / "config.json").is_file():
        train_dit(recipe, ctx.folder("cache_latents") / "latents", folder / "run", save_dir=dit_dir,
                  tokenizer=ctx.tokenizer(), progress=ctx.progress)
    meta = json.loads((dit_dir / "config.json").read_text())
    log = _last_log(folder / "run")
    return {"params": meta.get("params"), "steps": meta.get("steps"), "final_loss": log.get("loss")}


def _run_sample(ctx: RunContext, folder: Path) -> dict[str, Any]:
    from manifold_lab.diffusion.gfid import class_names_of
    from manifold_lab.diffusion.sample_run import SAMPLES_FILE, sample_dit
    from manifold_lab.diffusion.train_dit import load_dit
    from manifold_lab.train.device import resolve_device

    recipe = ctx.gfid_recipe()
    dit_dir = ctx.folder("train_dit") / "dit"
    out = folder / "samples"
    if not (out / SAMPLES_FILE).is_file():
        model, meta = load_dit(dit_dir, device=resolve_device(recipe.train.device))
        sample_dit(model, meta, ctx.tokenizer(), recipe.sample, out, dit_dir=dit_dir,
                   class_names=class_names_of(recipe))
    return {"samples": f"samples/{SAMPLES_FILE}", "num_samples": recipe.sample.num_samples}


def _run_evaluate(ctx: RunContext, folder: Path) -> dict[str, Any]:
    from manifold_lab.diffusion.evaluate import evaluate_samples
    from manifold_lab.diffusion.sample_run import SAMPLES_FILE

    recipe = ctx.gfid_recipe()
    samples = ctx.folder("sample") / "samples" / SAMPLES_FILE
    metrics = evaluate_samples(str(samples), recipe.eval.ref, recipe.eval, split=recipe.eval.ref_split,
                               max_items=recipe.eval.ref_max_items, image_size=int(ctx.tokenizer().image_size))
    return {"metrics": metrics, "gfid": metrics.get("fid")}


def _last_log(run_dir: Path) -> dict[str, Any]:
    """The last line of the engine's metrics log (for a summary of how training ended)."""
    path = run_dir / "metrics.jsonl"
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()] if path.is_file() else []
    try:
        return json.loads(lines[-1]) if lines else {}
    except json.JSONDecodeError:
        return {}


RUNNERS: dict[str, Callable[[RunContext, Path], dict[str, Any]]] = {
    "tokenizer": _run_tokenizer, "measure": _run_measure, "cache_latents": _run_cache,
    "train_dit": _run_train_dit, "sample": _run_sample, "evaluate": _run_evaluate,
}


@contextlib.contextmanager
def stage_lock(folder: Path) -> Iterator[None]:
    """An exclusive lock on one stage output, so parallel workers never compute it twice."""
    if distributed.world_size() > 1:  # under torchrun the launcher runs one stage at a time per run
        yield
        return
    with exclusive_lock(folder.parent / f".{folder.name}.lock"):
        yield


def run_stage(ctx: RunContext, stage: str) -> dict[str, Any]:
    """Run ``stage`` of ``ctx.run`` unless its output exists; returns its ``stage.json`` record."""
    folder = ctx.folder(stage)
    done = read_stage_record(folder)
    if done is not None:
        return done
    with stage_lock(folder):
        done = read_stage_record(folder)  # another worker may have finished it while we waited
        if done is not None:
            return done
        folder.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        result = RUNNERS[stage](ctx, folder)
        record = {"stage": stage, "key": ctx.key(stage), "run_id": ctx.run.run_id,
                  "config": stage_config(ctx, stage), "inputs": {d: ctx.key(d) for d in STAGES[stage]},
                  "result": result, "seconds": round(time.perf_counter() - started, 1),
                  "world_size": distributed.world_size(), "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        if distributed.is_main_process():
            write_json(folder / STAGE_FILE, record)
        distributed.barrier()
        return record


__all__ = ["RUNNERS", "RunContext", "STAGE_FILE", "read_stage_record", "run_stage", "stage_config"]
