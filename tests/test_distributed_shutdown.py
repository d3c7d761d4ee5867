"""Leaving the process group: ``distributed.shutdown`` and the CLI's exit path (world size 1, gloo)."""

from __future__ import annotations

import pytest
import torch.distributed as dist

from manifold_lab import distributed
from manifold_lab.cli import main


@pytest.fixture
def group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def test_shutdown_without_a_group_is_a_no_op() -> None:
    assert not distributed.is_distributed()
    distributed.shutdown()
    distributed.shutdown(wait=False)
    assert not distributed.is_distributed()


def test_shutdown_passes_a_barrier_then_destroys(group, monkeypatch) -> None:
    calls = []
    real = dist.barrier
    monkeypatch.setattr(dist, "barrier", lambda *a, **k: (calls.append("barrier"), real(*a, **k))[1])
    distributed.shutdown()
    assert calls == ["barrier"] and not distributed.is_distributed()


def test_cli_leaves_the_group_after_a_command(group, monkeypatch, capsys) -> None:
    calls = []
    monkeypatch.setattr(dist, "barrier", lambda *a, **k: calls.append("barrier"))
    main(["tokenizers"])
    assert "pae" in capsys.readouterr().out
    assert calls == ["barrier"] and not distributed.is_distributed()


def test_cli_failure_leaves_the_group_without_waiting_for_peers(group, monkeypatch, capsys) -> None:
    monkeypatch.setattr(dist, "barrier", lambda *a, **k: pytest.fail("a failed rank must not wait at a barrier"))
    with pytest.raises(SystemExit) as info:
        main(["measure", "--tokenizer", "no-such-tokenizer"])
    assert info.value.code == 2 and "no-such-tokenizer" in capsys.readouterr().err
    assert not distributed.is_distributed()
