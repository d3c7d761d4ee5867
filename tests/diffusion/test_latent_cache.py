"""cache-latents: content, flips, statistics, resume of a killed cache, refusal of a mismatched folder."""

from __future__ import annotations

import json

import pytest
import torch

from manifold_lab.diffusion.latent_cache import LatentCache, LatentDataset, cache_latents, tokenizer_fingerprint
from manifold_lab.errors import ManifoldLabError
from manifold_lab.tokenizers.base import LatentStats

from diffusion_helpers import Toy, tiny_tokenizer


def test_cache_holds_latents_flips_labels_and_the_tokenizers_own_stats(tmp_path):
    tok = tiny_tokenizer()
    tok.set_latent_stats(LatentStats(torch.tensor([0.1, -0.2, 0.3, 0.0]), torch.tensor([1.5, 2.0, 0.5, 1.0]), "test"))
    data = Toy()
    cache = cache_latents(tok, data, tmp_path / "c", batch_size=8, shard_size=10)
    assert cache.meta["num_shards"] == 3 and cache.num_items == 26 and cache.latent_shape == (4, 8, 8)
    stored = cache.load()
    with torch.no_grad():
        torch.testing.assert_close(stored["latents"], tok.encode(data.x))
        torch.testing.assert_close(stored["latents_flip"], tok.encode(torch.flip(data.x, dims=[-1])))
    assert torch.equal(stored["labels"], data.y) and torch.equal(stored["index"], torch.arange(26))
    assert cache.stats.how.startswith("the tokenizer's own") and cache.stats.std.tolist() == [1.5, 2.0, 0.5, 1.0]
    ds = LatentDataset(cache)
    assert len(ds) == 52 and ds.num_classes == 3
    z, y, i = ds[30]  # a flipped item
    torch.testing.assert_close(z, (stored["latents_flip"][4] - torch.tensor([0.1, -0.2, 0.3, 0.0]).view(-1, 1, 1))
                               / torch.tensor([1.5, 2.0, 0.5, 1.0]).view(-1, 1, 1))
    assert (y, i) == (int(data.y[4]), 30)
    # the memory-mapped path reads the same items as the in-memory one
    mapped = LatentDataset(cache, max_memory_bytes=0)
    assert mapped.latents is None
    for j in (0, 9, 10, 25, 26, 51):
        torch.testing.assert_close(mapped[j][0], ds[j][0])
        assert mapped[j][1:] == ds[j][1:]


def test_identity_stats_are_computed_from_the_cache(tmp_path):
    tok = tiny_tokenizer()  # untrained: identity statistics
    cache = cache_latents(tok, Toy(), tmp_path / "c", batch_size=8, shard_size=10, flip=False)
    z = cache.load()["latents"].double()
    torch.testing.assert_close(cache.stats.mean.double(), z.mean(dim=(0, 2, 3)),
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cache.stats.std.double(),
                               z.transpose(0, 1).flatten(1).std(1, unbiased=False), rtol=1e-4, atol=1e-6)
    assert "cached latents" in cache.stats.how
    normed = LatentDataset(cache).latents
    assert len(normed) == 26 and abs(float(normed.mean())) < 1e-4 and abs(float(normed.std()) - 1) < 0.01


def test_a_killed_cache_resumes_and_a_mismatched_folder_is_refused(tmp_path, monkeypatch):
    tok = tiny_tokenizer()
    import manifold_lab.diffusion.latent_cache as lc

    real = lc._encode_shard
    calls = {"n": 0}

    def dies_on_second_shard(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(lc, "_encode_shard", dies_on_second_shard)
    with pytest.raises(KeyboardInterrupt):
        cache_latents(tok, Toy(), tmp_path / "c", batch_size=8, shard_size=10)
    assert (tmp_path / "c" / "shard-00000.safetensors").is_file() and not (tmp_path / "c" / "meta.json").exists()
    with pytest.raises(ManifoldLabError, match="incomplete"):
        LatentCache(tmp_path / "c")
    monkeypatch.setattr(lc, "_encode_shard", real)
    calls["n"] = 0
    counted = {"n": 0}

    def counting(*a, **k):
        counted["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(lc, "_encode_shard", counting)
    cache = cache_latents(tok, Toy(), tmp_path / "c", batch_size=8, shard_size=10)
    assert counted["n"] == 2  # shards 1 and 2 only; shard 0 was kept
    fresh = cache_latents(tok, Toy(), tmp_path / "fresh", batch_size=8, shard_size=10)
    assert torch.equal(cache.load()["latents"], fresh.load()["latents"])
    # another tokenizer (or other settings) must not reuse this folder
    other = tiny_tokenizer()
    with torch.no_grad():
        next(other.parameters()).add_(0.1)
    assert tokenizer_fingerprint(other) != tokenizer_fingerprint(tok)
    with pytest.raises(ManifoldLabError, match="other settings.*tokenizer_fingerprint"):
        cache_latents(other, Toy(), tmp_path / "c", batch_size=8, shard_size=10)
    with pytest.raises(ManifoldLabError, match="num_items"):
        cache_latents(tok, Toy(), tmp_path / "c", num_items=5, batch_size=8, shard_size=10)
    assert json.loads((tmp_path / "c" / "meta.json").read_text())["num_items"] == 26


def test_bad_inputs_fail_in_one_line(tmp_path):
    tok = tiny_tokenizer()

    class Empty(Toy):
        def __len__(self):
            return 0

    with pytest.raises(ManifoldLabError, match="empty"):
        cache_latents(tok, Empty(), tmp_path / "e")

    class Unlabelled(Toy):
        def __getitem__(self, i):
            return self.x[i]

    with pytest.raises(ManifoldLabError, match="labelled"):
        cache_latents(tok, Unlabelled(), tmp_path / "u")
    with pytest.raises(ManifoldLabError, match="no latent cache"):
        LatentCache(tmp_path / "nothing")


def test_fingerprint_covers_zero_dim_buffers() -> None:
    """RAE keeps 0-dim integer buffers; the fingerprint must hash them (and see them change)."""
    tok = tiny_tokenizer()
    tok.register_buffer("counter", torch.tensor(3, dtype=torch.long))
    before = tokenizer_fingerprint(tok)
    tok.counter.fill_(4)
    assert tokenizer_fingerprint(tok) != before
