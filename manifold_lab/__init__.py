"""manifold-lab: is a tokenizer's latent space diffusion-friendly?

Measures SSC, LPC, GSQ and eRank (the PAE paper's geometry properties) beside reconstruction
quality and probes, for any tokenizer that follows :class:`manifold_lab.tokenizers.Tokenizer`.
"""

__version__ = "0.1.0"

from manifold_lab.errors import ManifoldLabError  # noqa: E402,F401
