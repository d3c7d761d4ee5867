"""Process entry points for the DiT DDP test (mp.spawn needs importable functions)."""

from __future__ import annotations

import os

import torch


def ddp_train(rank: int, world_size: int, port: int, cache: str, run_dir: str, overrides: list[str]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from manifold_lab import distributed
    from manifold_lab.diffusion.config import load_gfid_recipe
    from manifold_lab.diffusion.train_dit import train_dit

    recipe = load_gfid_recipe(budget="smoke", overrides=overrides)
    torch.manual_seed(0)
    train_dit(recipe, cache, run_dir, progress=False)
    distributed.shutdown()


def ddp_sample(rank: int, world_size: int, port: int, dit_dir: str, tokenizer_dir: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from manifold_lab import distributed
    from manifold_lab.diffusion.config import load_gfid_recipe
    from manifold_lab.diffusion.sample_run import sample_dit
    from manifold_lab.diffusion.train_dit import load_dit
    from manifold_lab.tokenizers import load_tokenizer

    distributed.init_from_env()
    recipe = load_gfid_recipe(budget="smoke")
    model, meta = load_dit(dit_dir)
    sample_dit(model, meta, load_tokenizer(tokenizer_dir), recipe.sample, out, dit_dir=dit_dir)
    distributed.shutdown()
