"""The pure-PyTorch backend of kl_penalty (`kl_fwd`, the interface of fastppo.kernels.kl), in the kernel's
closed form: the value and its derivative in logp. `kl_terms` is also the KL term of the loss
aggregation (fastppo.losses_torch)."""

from __future__ import annotations

import torch


def clamp_grad(x, lo, hi):
    """d clamp(x, lo, hi) / dx (1 on the closed range, 0 outside and at NaN)."""
    return ((x >= lo) & (x <= hi)).to(x.dtype)



def kl_terms(logp, ref, kind):
    """(KL, dKL/dlogp) of the estimator `kind`, d = logp - ref (fastppo.modes.KL_KINDS)."""
    d = logp - ref
    if kind == "k1":
        return d, torch.ones_like(d)   # autograd of d: 1 even where d is NaN
    if kind == "abs":
        return d.abs(), torch.sign(torch.nan_to_num(d, nan=0.0))   # torch's abs backward: sgn(NaN) = 0
    if kind in ("k2", "mse"):
        return 0.5 * d * d, d
    if kind == "k3":
        e = torch.exp(-d)
        return e - 1 + d, 1 - e
    dc = d.clamp(-20, 20)
    e = torch.exp(-dc)
    k = e - 1 + dc
    return k.clamp(-10, 10), torch.where((clamp_grad(d, -20, 20) * clamp_grad(k, -10, 10)) != 0, 1 - e,
                                         torch.zeros_like(d))


def kl_fwd(logp, ref, kind):
    """Returns (kl, dkl/dlogp) in fp32 (fp64 for fp64 inputs), shaped like logp."""
    acc = torch.float64 if torch.float64 in (logp.dtype, ref.dtype) else torch.float32
    return kl_terms(logp.to(acc), ref.to(acc), kind)
