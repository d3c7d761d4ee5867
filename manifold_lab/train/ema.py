"""Exponential moving average of a model's weights (parameters AND floating-point buffers).

Sampling and evaluation use the EMA copy: its weights are ``ema <- decay * ema + (1 - decay) * w``
after every optimizer step, which smooths the last ~1/(1-decay) steps of SGD noise. Floating buffers
(e.g. BatchNorm running statistics) are averaged the same way; integer buffers (step counters) are
copied, since an average of counters means nothing.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def make_ema(model: nn.Module) -> nn.Module:
    """A frozen deep copy of ``model`` (eval mode, no grads) that :func:`ema_update` keeps averaged."""
    ema = copy.deepcopy(model)
    ema.eval()
    ema.requires_grad_(False)
    return ema


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """``ema <- decay * ema + (1 - decay) * model`` for every float tensor of the state; copy the rest."""
    ema_state = ema.state_dict(keep_vars=True)
    model_state = model.state_dict(keep_vars=True)
    if ema_state.keys() != model_state.keys():
        missing = sorted(set(model_state) ^ set(ema_state))[:5]
        raise RuntimeError(f"EMA and model have different state keys (e.g. {missing}); rebuild the EMA")
    floats_e, floats_m = [], []
    seen: set[int] = set()  # tied weights appear under several names: average them once
    for key, e in ema_state.items():
        if id(e) in seen:
            continue
        seen.add(id(e))
        m = model_state[key].detach()
        if e.dtype.is_floating_point:
            floats_e.append(e.data if isinstance(e, nn.Parameter) else e)
            floats_m.append(m.to(e.dtype))
        else:
            e.copy_(m)
    if floats_e:
        # lerp(e, m, w) = e + w (m - e) = (1 - w) e + w m with w = 1 - decay.
        torch._foreach_lerp_(floats_e, floats_m, 1.0 - decay)
