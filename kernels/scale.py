"""out = x * g for a tensor x and a device scalar g (the upstream gradient of a loss whose gradients were formed
in its forward pass: fused_linear_ppo_loss's d(hidden), d(weight), d(bias)), computed in fp32 (fp64 for fp64 x)
and rounded once to x's dtype: one read and one write of x (4 bytes per bf16 element), no temporaries."""

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from . import _config as cfg
from .launches import record_launch


@triton.jit
def _scale_kernel(x_ptr, g_ptr, out_ptr, n, BLOCK: tl.constexpr, ACC: tl.constexpr):
    """out[i] = x[i] * g, in ACC, one BLOCK of elements per program (64-bit offsets)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    g = tl.load(g_ptr).to(ACC)
    x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(ACC)
    tl.store(out_ptr + offs, (x * g).to(out_ptr.dtype.element_ty), mask=ok)


def scale(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """x * g (g: a 0-d tensor on x's device) as a new tensor of x's dtype and shape (x made contiguous first)."""
    x = x.contiguous()
    out = torch.empty_like(x)
    n = x.numel()
    acc = tl.float64 if x.dtype == torch.float64 else tl.float32
    record_launch("scale", x, g, out)
    if n:
        wrap_triton(_scale_kernel)[(triton.cdiv(n, cfg.ELEM_BLOCK),)](
            x, g.reshape(1), out, n, BLOCK=cfg.ELEM_BLOCK, ACC=acc, num_warps=cfg.ELEM_NUM_WARPS)
    return out


def aot_specs(AOTSpec, sig):
    ce = dict(BLOCK=cfg.ELEM_BLOCK, ACC=tl.float32)
    types = dict(x_ptr="*bf16", g_ptr="*fp32", out_ptr="*bf16", n="i64")
    return [AOTSpec("scale[bf16]", _scale_kernel, sig(_scale_kernel, types, ce), ce, ("n",), True,
                    cfg.ELEM_NUM_WARPS)]
