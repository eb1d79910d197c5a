"""Elementwise KL penalty between per-token log-probs: value and derivative in one launch
(the derivative is saved for backward, which is then one multiply)."""

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ..modes import KL_KIND_IDS
from . import _config as cfg
from ._rows import acc_dtype
from ._terms import kl_terms
from .launches import record_launch


@triton.jit
def _kl_fwd_kernel(logp_ptr, ref_ptr, kl_ptr, dkl_ptr, n, KIND: tl.constexpr, BLOCK: tl.constexpr,
                   ACC: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < n
    logp = tl.load(logp_ptr + offs, mask=inb, other=0.0).to(ACC)
    ref = tl.load(ref_ptr + offs, mask=inb, other=0.0).to(ACC)
    kl, dkl = kl_terms(logp, ref, KIND)
    tl.store(kl_ptr + offs, kl, mask=inb)
    tl.store(dkl_ptr + offs, dkl, mask=inb)


def kl_fwd(logp: torch.Tensor, ref: torch.Tensor, kind: str):
    """Returns (kl, dkl/dlogp), float32 (float64 for float64 inputs), shaped like logp."""
    a = logp.reshape(-1).contiguous()
    b = ref.reshape(-1).contiguous()
    acc, tl_acc = acc_dtype(torch.promote_types(logp.dtype, ref.dtype))
    kl = torch.empty(a.shape, dtype=acc, device=a.device)
    dkl = torch.empty_like(kl)
    n = a.numel()
    if n:
        record_launch("kl_fwd", a, b, kl, dkl)
        wrap_triton(_kl_fwd_kernel)[(triton.cdiv(n, cfg.ELEM_BLOCK),)](
            a, b, kl, dkl, n, KIND=KL_KIND_IDS[kind], BLOCK=cfg.ELEM_BLOCK, ACC=tl_acc, num_warps=cfg.ELEM_NUM_WARPS)
    return kl.view(logp.shape), dkl.view(logp.shape)
