"""Tokenizer implementations, installed as ``manifold_lab.tokenizers``.

Import as ``from manifold_lab.tokenizers import ...`` (never as a top-level ``tokenizers``: that
name belongs to Hugging Face's package). Importing this package registers the built-in tokenizers;
installed packages add theirs through the ``manifold_lab.tokenizers`` entry-point group.

* :class:`Tokenizer` -- the protocol every metric and trainer relies on; :class:`TokenizerBase`
  -- shared parts (validation, latent stats, save); :func:`load_tokenizer` reads a saved folder.
* :func:`get_spec`, :func:`list_tokenizers`, :func:`build_tokenizer` -- the registry.
* :func:`train_tokenizer` -- train from a recipe; :func:`get_pretrained` -- the cached default.
"""

if __name__ != "manifold_lab.tokenizers":  # e.g. `import tokenizers` run from the checkout's root folder
    raise ImportError(
        f"this folder ({__file__}) is manifold-lab's tokenizer zoo and is importable only as "
        "manifold_lab.tokenizers; a top-level `tokenizers` is Hugging Face's package. Run Python from "
        "another folder than the manifold-lab checkout, or import manifold_lab.tokenizers."
    )

from manifold_lab.tokenizers.base import HasReferenceMaps, LatentStats, Tokenizer, TokenizerBase, load_tokenizer
from manifold_lab.tokenizers.registry import (
    TOKENIZERS,
    TokenizerSpec,
    build_tokenizer,
    get_spec,
    list_tokenizers,
    register_tokenizer,
)
from manifold_lab.tokenizers.vae import VAE, VAEConfig, vae_loss
from manifold_lab.tokenizers import vavae  # noqa: F401,E402  (registers "vavae")
from manifold_lab.tokenizers import ul  # noqa: F401,E402  (registers "ul")
from manifold_lab.tokenizers import rae  # noqa: F401,E402  (registers "rae")
from manifold_lab.tokenizers import svg  # noqa: F401,E402  (registers "svg")
from manifold_lab.tokenizers import pae  # noqa: F401,E402  (registers "pae")
from manifold_lab.tokenizers.training import (
    DataSection,
    TokenizerRecipe,
    compute_latent_stats,
    load_recipe,
    train_tokenizer,
)
from manifold_lab.tokenizers.pretrained import cache_root, get_pretrained, pretrained_dir

__all__ = [
    "HasReferenceMaps", "LatentStats", "Tokenizer", "TokenizerBase", "load_tokenizer",
    "TOKENIZERS", "TokenizerSpec", "build_tokenizer", "get_spec", "list_tokenizers", "register_tokenizer",
    "VAE", "VAEConfig", "vae_loss",
    "DataSection", "TokenizerRecipe", "compute_latent_stats", "load_recipe", "train_tokenizer",
    "cache_root", "get_pretrained", "pretrained_dir",
]
