"""Latent diffusion on a tokenizer's latents: LightningDiT, the flow-matching transport, samplers, gFID.

The time convention (the ONE convention of the whole package; every module here follows it)
---------------------------------------------------------------------------------------------
* ``t`` is a float in ``[0, 1]``; **t = 0 is data, t = 1 is pure Gaussian noise**.
* Linear (rectified-flow) path: ``x_t = (1 - t) * x_0 + t * eps`` with ``x_0`` a (normalised) latent
  and ``eps ~ N(0, I)``.
* The network predicts the velocity ``v = d x_t / d t = eps - x_0``. From ``(x_t, v)``:
  ``x_0 = x_t - t * v`` and ``eps = x_t + (1 - t) * v``; the score is ``-eps / t``.
* Sampling integrates ``dx/dt = v(x, t)`` from ``t = 1`` (noise) down to ``t = 0`` (data).
* Time shift ``s >= 1`` moves time towards the noise end: ``shift(t) = s t / (1 + (s - 1) t)``.
  The dimension-dependent shift of RAE is ``s = sqrt(C * h * w / 4096)``. The same shift is applied
  to training times and to the sampling grid.
* Classifier-free guidance: ``v = v_uncond + w (v_cond - v_uncond)`` on ALL latent channels, used
  only while ``t`` lies inside the guidance interval ``[lo, hi]`` (in this convention); the null
  label is ``num_classes``.

This is the convention of SD3 and RAE. LightningDiT / SiT write the same path with the opposite
time (their ``t = 1`` is data); converting a reference setting means ``t_ours = 1 - t_theirs``
(e.g. LightningDiT's ``cfg_interval_start: 0.125`` is our interval ``[0, 0.875]``, and its sampling
``timestep_shift: 0.3``, written in its reversed time, is our shift ``1 / 0.3``).
"""
