"""SSC, spatial structure coherence: do a latent's tokens cluster like the image's segments?
(higher is better; specs/metrics.md).

Per image: cosine affinities between L2-normalised tokens, exp(<z_i, z_j> / sigma) with a zero
diagonal, normalised spectral clustering (Ng-Jordan-Weiss: k smallest eigenvectors of
L_sym = I - D^-1/2 A D^-1/2, rows L2-normalised, k-means) into k = number of true segments, then
NMI (geometric normalisation) against the segments at latent resolution.

Why batched: scikit-learn clusters one image at a time (ARPACK + k-means in Python), which costs
seconds per thousand images. Here images with the same k share one eigensolver run on a (G, N, N)
stack (Chebyshev-filtered subspace iteration for the k wanted eigenvectors, ``torch.linalg.eigh``
as the exact fallback) and one batched k-means over (G * n_init) restarts, on the latents' device.

Why every image gets the same random numbers: k-means++ draws its seeds from one uniform
(n_init, k) table made from ``seed``, and the eigensolver starts every image from the same fixed
random block. An image's result then depends only on its own latents and the seed, not on which
batch or which process it landed in, so splitting a dataset across batches or DDP ranks gives the
per-image values of one big run.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist

from manifold_lab.distributed import all_gather_rows, is_distributed
from manifold_lab.metrics._inputs import MetricInputError, as_tensor, check_finite, check_ndim

# Budget (bytes) for one (G, N, N) affinity stack: small enough for the allocator to reuse memory.
_STACK_BYTES = 32 * 2**20


def _integer_labels(t: torch.Tensor, what: str) -> torch.Tensor:
    if t.dtype == torch.bool:
        return t.long()
    if t.is_floating_point():
        check_finite(t, what)
        if not bool((t == t.round()).all()):
            raise MetricInputError(f"{what} must hold integer segment ids, got non-integral float values")
    elif t.is_complex():
        raise MetricInputError(f"{what} must hold integer segment ids, got {t.dtype}")
    return t.long()


def downsample_segments(masks: Any, size: tuple[int, int]) -> torch.Tensor:
    """Segment ids (B, H, W) -> (B, h, w) by majority vote (mode) inside each latent cell.

    H and W must be multiples of h and w (else ``ValueError``). Ties go to the smallest segment id.
    A (B, 1, H, W) mask is accepted too. Runs on the masks' device.
    """
    m = as_tensor(masks, "downsample_segments: masks")
    if m.ndim == 4 and m.shape[1] == 1:
        m = m[:, 0]
    check_ndim(m, 3, "downsample_segments: masks", "(B,H,W)")
    m = _integer_labels(m, "downsample_segments: masks")
    h, w = (int(s) for s in size)
    b, hh, ww = m.shape
    if h < 1 or w < 1 or hh % h or ww % w:
        raise MetricInputError(f"downsample_segments: mask size {hh}x{ww} is not a multiple of the latent grid "
                               f"{h}x{w}; resize the masks (nearest) to a multiple first")
    fh, fw = hh // h, ww // w
    if fh == 1 and fw == 1:
        return m.clone()
    values, inverse = torch.unique(m, return_inverse=True)
    cells = inverse.reshape(b, h, fh, w, fw).permute(0, 1, 3, 2, 4).reshape(b, h, w, fh * fw)
    out = torch.empty((b, h, w), dtype=torch.long, device=m.device)
    # one image at a time bounds the (h, w, K) vote table when K (distinct ids in the batch) is large
    for i in range(b):
        counts = torch.zeros((h, w, values.numel()), dtype=torch.int32, device=m.device)
        counts.scatter_add_(-1, cells[i], torch.ones_like(cells[i], dtype=torch.int32))
        out[i] = values[counts.argmax(dim=-1)]  # first maximum = smallest id on ties
    return out


def _compact_rows(seg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of (B, N) ids: ids renumbered 0..k-1 (in sorted order) and k."""
    sorted_ids, order = seg.sort(dim=1)
    new = torch.ones_like(sorted_ids, dtype=torch.bool)
    new[:, 1:] = sorted_ids[:, 1:] != sorted_ids[:, :-1]
    ranks = new.long().cumsum(dim=1) - 1
    compact = torch.empty_like(ranks).scatter_(1, order, ranks)
    return compact, new.sum(dim=1)


def normalized_affinity(tokens: torch.Tensor, sigma: float, dtype: torch.dtype = torch.float32
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """M = D^-1/2 A D^-1/2 (G, N, N) and its top eigenvector (G, N) for token stacks (G, N, C).

    A_ij = exp((<z_i, z_j> - top) / sigma) with A_ii = 0, tokens L2-normalised, ``top`` the image's
    largest off-diagonal cosine: scaling A by a constant leaves M (hence L_sym = I - M and its
    eigenvectors) unchanged but keeps exp() finite for small sigma. A token whose affinities all
    underflow gets degree 0 and a zero row. Built in place to keep memory traffic low; float32
    is ample for clustering (eigenvector residuals ~1e-5 against gaps of ~1e-1).
    """
    z = tokens.to(dtype)
    norms = z.norm(dim=-1, keepdim=True)
    z = z / torch.where(norms > 0, norms, torch.ones_like(norms))
    a = z @ z.transpose(1, 2)
    a.diagonal(dim1=1, dim2=2).fill_(-torch.inf)
    top = a.amax(dim=(1, 2), keepdim=True)
    a.sub_(top).div_(float(sigma)).exp_()  # diagonal: exp(-inf) = 0
    degree = a.sum(dim=2)
    d_isqrt = torch.where(degree > 0, degree.clamp_min(torch.finfo(dtype).tiny).rsqrt(), torch.zeros_like(degree))
    a.mul_(d_isqrt[:, :, None]).mul_(d_isqrt[:, None, :])
    v1 = degree.sqrt()
    return a, v1 / v1.norm(dim=1, keepdim=True).clamp_min(torch.finfo(dtype).tiny)


def _rayleigh_ritz(m: torch.Tensor, xt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Orthonormalise the block of rows xt (G, p, N); Ritz values (G, p) ascending, Ritz vectors as
    rows (G, p, N) and the rows of (M @ vectors)^T.

    Blocks are kept as rows because (p x N) @ (N x N) runs ~2x faster than (N x N) @ (N x p) in
    batched CPU matmul, and M is symmetric so x^T M = (M x)^T.
    """
    qt = torch.linalg.qr(xt.transpose(1, 2)).Q.transpose(1, 2).contiguous()
    mqt = qt @ m
    h = qt @ mqt.transpose(1, 2)
    theta, w = torch.linalg.eigh((h + h.transpose(1, 2)) / 2)
    wt = w.transpose(1, 2)
    return theta, wt @ qt, wt @ mqt


def top_eigenvectors(m: torch.Tensor, v1: torch.Tensor, k: int, tol: float = 1e-5, degree: int = 8,
                     extra: int = 2, max_rounds: int = 30) -> tuple[torch.Tensor, int]:
    """Eigenvectors (G, N, k) of the k largest eigenvalues of symmetric M (G, N, N), spectrum in [-1, 1].

    Chebyshev-filtered subspace iteration (Zhou & Saad): a block of k + ``extra`` vectors, started
    from the known top eigenvector ``v1`` and a fixed seeded random block (so results do not depend
    on batching), is multiplied by a degree-``degree`` Chebyshev polynomial of M that damps
    [-1, b] (b = the block's smallest Ritz value) and keeps eigenvalue 1 at scale 1, then
    Rayleigh-Ritz. It stops per image when the k wanted Ritz pairs have residual
    ||M v - theta v|| <= tol. This needs a few dozen products with M instead of a full
    eigendecomposition; images that do not converge in ``max_rounds`` (no spectral gap) fall back
    to ``torch.linalg.eigh`` in float64. Only the k-dimensional subspace matters downstream: the
    row-normalised embedding and k-means are invariant to a rotation within it.

    Returns the vectors and the number of images that needed the fallback.
    """
    g, n, _ = m.shape
    p = min(n, k + extra)
    if p >= n:
        return torch.linalg.eigh(m.to(torch.float64))[1][:, :, -k:].to(m.dtype), 0
    gen = torch.Generator(device="cpu").manual_seed(12345)
    start = torch.randn((p, n), generator=gen, dtype=torch.float64).to(device=m.device, dtype=m.dtype)
    xt = start.expand(g, p, n).clone()
    xt[:, 0] = v1
    theta, xt, mxt = _rayleigh_ritz(m, xt)
    out = torch.empty((g, k, n), dtype=m.dtype, device=m.device)
    active = torch.arange(g, device=m.device)
    lower = -1.0
    for rnd in range(max_rounds + 1):
        res = (mxt[:, -k:] - xt[:, -k:] * theta[:, -k:, None]).norm(dim=2).amax(dim=1)
        done = res <= tol
        if bool(done.any()):
            out[active[done]] = xt[done][:, -k:]
            keep = ~done
            active, m, xt, mxt, theta = active[keep], m[keep], xt[keep], mxt[keep], theta[keep]
        if active.numel() == 0 or rnd == max_rounds:
            break
        # scaled Chebyshev filter damping [lower, b], normalised to 1 at eigenvalue 1
        b = theta[:, 0].clamp(min=lower + 0.1, max=0.99)[:, None, None]
        e, c = (b - lower) / 2, (b + lower) / 2
        s1 = e / (1 - c)
        s = s1
        y_prev, y = xt, (mxt - c * xt) * (s1 / e)
        for _ in range(2, degree + 1):
            s_new = 1 / (2 / s1 - s)
            y_prev, y = y, (y @ m - c * y) * (2 * s_new / e) - (s * s_new) * y_prev
            s = s_new
        theta, xt, mxt = _rayleigh_ritz(m, y)
    if active.numel():
        out[active] = torch.linalg.eigh(m.to(torch.float64))[1][:, :, -k:].transpose(1, 2).to(out.dtype)
    return out.transpose(1, 2), int(active.numel())


def spectral_embedding(tokens: torch.Tensor, k: int, sigma: float) -> torch.Tensor:
    """Ng-Jordan-Weiss embedding (G, N, k) of token stacks (G, N, C), as float64.

    The k eigenvectors of the smallest eigenvalues of L_sym = I - M are those of the largest of M.
    """
    m, v1 = normalized_affinity(tokens, sigma)
    emb, _ = top_eigenvectors(m, v1, k)
    emb = emb.to(torch.float64)
    rn = emb.norm(dim=-1, keepdim=True)
    return emb / torch.where(rn > 0, rn, torch.ones_like(rn))


def kmeans_batched(x: torch.Tensor, k: int, n_init: int = 10, seed: int = 0,
                   max_iter: int = 300, tol: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """k-means (k-means++ init, ``n_init`` restarts, Lloyd) on each of G point sets (G, N, D).

    Returns (labels (G, N), inertia (G,)) of the best restart per set (lowest inertia; first on
    ties). All sets use the same uniform draws (see module docstring). Empty clusters keep their
    previous centre. Final labels are the nearest centres after the last update.
    """
    g, n, d = x.shape
    if not 1 <= k <= n:
        raise MetricInputError(f"kmeans: k={k} must be between 1 and the number of points {n}")
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    draws = torch.rand((n_init, k), generator=gen, dtype=torch.float64).to(x.device)
    draws = draws.repeat(g, 1)  # (g * n_init, k): restart r of every set uses draws[r]
    pts = x.to(torch.float64).repeat_interleave(n_init, dim=0)  # (GR, N, D)
    gr = pts.shape[0]
    rows = torch.arange(gr, device=x.device)

    # k-means++ seeding by inverse-CDF sampling of the D^2 weights
    centres = torch.empty((gr, k, d), dtype=pts.dtype, device=x.device)
    first = (draws[:, 0] * n).long().clamp_max(n - 1)
    centres[:, 0] = pts[rows, first]
    d2 = ((pts - centres[:, :1]) ** 2).sum(-1)
    for j in range(1, k):
        cum = d2.cumsum(dim=1)
        total = cum[:, -1:]
        target = (draws[:, j:j + 1] * total).contiguous()
        idx = torch.searchsorted(cum, target, right=True).squeeze(1).clamp_max(n - 1)
        # every point already coincides with a centre: fall back to a uniform pick
        uniform = (draws[:, j] * n).long().clamp_max(n - 1)
        idx = torch.where(total.squeeze(1) > 0, idx, uniform)
        centres[:, j] = pts[rows, idx]
        d2 = torch.minimum(d2, ((pts - centres[:, j:j + 1]) ** 2).sum(-1))

    def sq_dist(p: torch.Tensor, p_sq: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """(G', N, k) squared distances without a (G', N, k, D) temporary."""
        return (p_sq - 2 * p @ c.transpose(1, 2) + (c * c).sum(-1)[:, None, :]).clamp_min(0)

    # Lloyd until a restart's centres move less than tol * (mean per-dimension variance of its
    # points), scikit-learn's criterion, or max_iter; converged restarts leave the working set
    thresh = float(tol) * pts.var(dim=1, unbiased=False).mean(dim=1)  # (GR,)
    work = torch.arange(gr, device=x.device)
    pts_sq = (pts * pts).sum(-1, keepdim=True)
    p_w, s_w, c_w, t_w = pts, pts_sq, centres, thresh
    for _ in range(max_iter):
        gw = p_w.shape[0]
        assign = sq_dist(p_w, s_w, c_w).argmin(dim=-1)
        flat = (assign + k * torch.arange(gw, device=x.device)[:, None]).reshape(-1)
        counts = torch.bincount(flat, minlength=gw * k).reshape(gw, k).to(pts.dtype)
        sums = torch.zeros((gw * k, d), dtype=pts.dtype, device=x.device).index_add_(0, flat, p_w.reshape(-1, d))
        new_c = torch.where(counts[..., None] > 0, sums.reshape(gw, k, d) / counts.clamp_min(1)[..., None], c_w)
        moving = ((new_c - c_w) ** 2).sum(dim=(1, 2)) > t_w
        c_w = new_c
        if not bool(moving.all()):
            centres[work] = c_w
            work, p_w, s_w, c_w, t_w = work[moving], p_w[moving], s_w[moving], c_w[moving], t_w[moving]
            if work.numel() == 0:
                break
    if work.numel():
        centres[work] = c_w
    best_d, assign = sq_dist(pts, pts_sq, centres).min(dim=-1)
    inertia = best_d.clamp_min(0).sum(dim=1).reshape(g, n_init)
    best = inertia.argmin(dim=1)
    labels = assign.reshape(g, n_init, n)[torch.arange(g, device=x.device), best]
    return labels, inertia[torch.arange(g, device=x.device), best]


def nmi_batched(truth: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    """Geometric-mean NMI per row of two (G, N) labelings with ids in 0..K-1.

    Follows scikit-learn's ``normalized_mutual_info_score(average_method="geometric")``:
    1 when both labelings have a single cluster, 0 when the mutual information is 0.
    """
    g, n = truth.shape
    kk = int(max(truth.max().item(), pred.max().item())) + 1
    cont = torch.zeros((g, kk * kk), dtype=torch.float64, device=truth.device)
    cont.scatter_add_(1, truth * kk + pred, torch.ones_like(truth, dtype=torch.float64))
    p = cont.reshape(g, kk, kk) / n
    pt, pp = p.sum(dim=2), p.sum(dim=1)

    def plogp(q: torch.Tensor) -> torch.Tensor:
        return torch.where(q > 0, q * torch.log(torch.where(q > 0, q, torch.ones_like(q))), torch.zeros_like(q))

    h_t = -plogp(pt).sum(dim=1)
    h_p = -plogp(pp).sum(dim=1)
    outer = pt[:, :, None] * pp[:, None, :]
    ratio = torch.where(p > 0, p / torch.where(outer > 0, outer, torch.ones_like(outer)), torch.ones_like(p))
    mi = (torch.where(p > 0, p * torch.log(ratio), torch.zeros_like(p))).sum(dim=(1, 2)).clamp_min(0)
    norm = torch.sqrt(h_t * h_p)
    nmi = torch.where(mi > 0, mi / torch.where(norm > 0, norm, torch.ones_like(norm)), torch.zeros_like(mi))
    single = ((pt > 0).sum(dim=1) == 1) & ((pp > 0).sum(dim=1) == 1)
    return torch.where(single, torch.ones_like(nmi), nmi)


def _validate(latents: Any, segments: Any, sigma: float, n_init: int) -> tuple[torch.Tensor, torch.Tensor]:
    z = as_tensor(latents, "ssc: latents")
    check_ndim(z, 4, "ssc: latents", "(B,C,h,w)")
    if not z.is_floating_point():
        z = z.to(torch.float64)
    check_finite(z, "ssc: latents")
    s = as_tensor(segments, "ssc: segments", device=z.device)
    check_ndim(s, 3, "ssc: segments", "(B,h,w) at latent resolution")
    b, _, h, w = z.shape
    if tuple(s.shape) != (b, h, w):
        raise MetricInputError(f"ssc: segments have shape {tuple(s.shape)} but latents {tuple(z.shape)} need "
                               f"({b}, {h}, {w}); downsample masks with downsample_segments(masks, ({h}, {w}))")
    try:
        ok = math.isfinite(float(sigma)) and float(sigma) > 0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise MetricInputError(f"ssc: sigma must be a positive number, got {sigma!r}")
    if int(n_init) < 1:
        raise MetricInputError(f"ssc: n_init must be >= 1, got {n_init}")
    return z, _integer_labels(s, "ssc: segments")


def ssc_clusters(latents: Any, segments: Any, sigma: float = 0.1, seed: int = 0,
                 n_init: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Spectral clusters (B, h, w) and per-image NMI (B,) of latents against segments.

    Images with fewer than 2 segments get cluster 0 everywhere and NMI = NaN.
    """
    z, s = _validate(latents, segments, sigma, n_init)
    b, c, h, w = z.shape
    n = h * w
    tokens = z.reshape(b, c, n).transpose(1, 2)  # (B, N, C)
    truth, ks = _compact_rows(s.reshape(b, n))
    clusters = torch.zeros((b, n), dtype=torch.long, device=z.device)
    nmi = torch.full((b,), float("nan"), dtype=torch.float64, device=z.device)
    per_chunk = max(1, _STACK_BYTES // (n * n * 4))
    for k in sorted({int(v) for v in ks.tolist() if v >= 2}):
        idx = torch.nonzero(ks == k).squeeze(1)
        for start in range(0, idx.numel(), per_chunk):
            sel = idx[start:start + per_chunk]
            emb = spectral_embedding(tokens[sel], k, float(sigma))
            labels, _ = kmeans_batched(emb, k, n_init=int(n_init), seed=seed)
            clusters[sel] = labels
            nmi[sel] = nmi_batched(truth[sel], labels)
    return clusters.reshape(b, h, w), nmi


def ssc_per_image(latents: Any, segments: Any, sigma: float = 0.1, seed: int = 0, n_init: int = 10) -> torch.Tensor:
    """NMI per image (B,) float64; NaN for images with fewer than 2 segments."""
    return ssc_clusters(latents, segments, sigma=sigma, seed=seed, n_init=n_init)[1]


def _summary(values: torch.Tensor, n_total: int, sigma: float, seed: int, n_init: int) -> dict[str, Any]:
    valid = values[~torch.isnan(values)]
    n = int(valid.numel())
    return {
        "mean": float(valid.mean().item()) if n else float("nan"),
        "std": float(valid.std(unbiased=False).item()) if n else float("nan"),
        "n_images": n,
        "n_skipped": int(n_total - n),
        "sigma": float(sigma),
        "seed": int(seed),
        "n_init": int(n_init),
        "nmi_average": "geometric",
        "eigensolver": "chebyshev-filtered subspace iteration (float32, residual <= 1e-5), eigh fallback",
        "kmeans": "k-means++ init, Lloyd, tol 1e-4, max_iter 300",
    }


def ssc(latents: Any, segments: Any, sigma: float = 0.1, seed: int = 0, n_init: int = 10) -> float:
    """Mean SSC over images with >= 2 segments (NaN if there are none)."""
    values = ssc_per_image(latents, segments, sigma=sigma, seed=seed, n_init=n_init)
    valid = values[~torch.isnan(values)]
    return float(valid.mean().item()) if valid.numel() else float("nan")


def ssc_report(latents: Any, segments: Any, sigma: float = 0.1, seed: int = 0, n_init: int = 10) -> dict[str, Any]:
    """Mean and population std of per-image SSC, the counts used/skipped and the parameters."""
    values = ssc_per_image(latents, segments, sigma=sigma, seed=seed, n_init=n_init)
    return _summary(values, values.numel(), sigma, seed, n_init)


def _collective_device(fallback: torch.device | None) -> torch.device:
    if fallback is not None:
        return fallback
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class SSCAccumulator:
    """Streams batches of (latents, segments); ``compute()`` gathers per-image SSC over processes.

    Only the per-image NMI values are kept, never the latents.
    """

    def __init__(self, sigma: float = 0.1, seed: int = 0, n_init: int = 10) -> None:
        self.sigma, self.seed, self.n_init = float(sigma), int(seed), int(n_init)
        self._values: list[torch.Tensor] = []
        self._device: torch.device | None = None

    def update(self, latents: Any, segments: Any) -> torch.Tensor:
        """Cluster one batch; returns its per-image values (NaN where skipped)."""
        v = ssc_per_image(latents, segments, sigma=self.sigma, seed=self.seed, n_init=self.n_init)
        self._device = v.device
        self._values.append(v)
        return v

    def values(self) -> torch.Tensor:
        """Per-image values of every process (NaN where skipped); a collective call under DDP."""
        dev = _collective_device(self._device)
        local = (torch.cat([v.to(dev) for v in self._values]) if self._values
                 else torch.empty(0, dtype=torch.float64, device=dev))
        return all_gather_rows(local)

    def compute(self) -> dict[str, Any]:
        v = self.values()
        return _summary(v, v.numel(), self.sigma, self.seed, self.n_init)
