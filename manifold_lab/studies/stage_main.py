"""``python -m manifold_lab.studies.stage_main SPEC``: one study stage, as launched by torchrun.

Every process initialises the process group from torchrun's environment, runs the stage (the
training engine, latent caching, sampling and evaluation shard their work over ranks) and rank 0
writes ``stage.json``; every rank then leaves the process group together
(:func:`manifold_lab.distributed.shutdown`). On failure rank 0 writes the one-line error to
``error.txt`` in the stage's folder, which the launching executor reports
(:func:`manifold_lab.studies.executors.torchrun_stage_fn`).
"""

from __future__ import annotations

import sys

from manifold_lab import distributed
from manifold_lab.io import write_text
from manifold_lab.studies.executors import ERROR_FILE, load_spec
from manifold_lab.studies.stages import run_stage


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m manifold_lab.studies.stage_main SPEC.json", file=sys.stderr)
        return 2
    distributed.init_from_env()
    ctx, stage = load_spec(args[0])
    try:
        run_stage(ctx, stage)
    except Exception as exc:  # noqa: BLE001 -- reported to the launcher in one line
        if distributed.is_main_process():
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            write_text(ctx.folder(stage) / ERROR_FILE, f"{type(exc).__name__}: {first}\n")
        distributed.shutdown(wait=False)  # the other ranks may never reach a barrier
        raise
    distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
