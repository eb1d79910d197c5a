"""The products of the distillation ops' heads (linear_divergence, linear_divergence_loss, linear_topk_divergence):
the logits z = h W^T and the gradient products d W, d^T h, kept in fp32 (fp64 for fp64) and never rounded to the
operands' dtype.

On CUDA, with 16-bit operands of one dtype: cuBLAS GEMMs with an fp32 output (`out_dtype`), the operands read once in
their own dtype (per chunk of rows: both heads' weights once, the fp32 d(weight) sum once). Elsewhere (CPU, mixed or
fp32 / fp64 operands): linear_torch's products of upcast operands, the weight upcast a block at a time. Both are exact
products (a bf16 / fp16 product is exact in fp32) summed in fp32; only the summation order differs. The gradient tile
d [rows, V] enters the backward products in the head's dtype when that is 16-bit (rounded once, as the Triton linear
pipeline's dz and TRL's chunked functions do; the sums stay fp32) on every device, so the CPU tests see the GPU's
numbers. `fastppo.bench.peers.as_on_gpu` routes the CPU counts through the CUDA branch."""

from __future__ import annotations

import torch

from . import linear_torch
from .options import LogitTransform

HALF = (torch.bfloat16, torch.float16)


def half_pair(a: torch.Tensor, b: torch.Tensor, acc: torch.dtype) -> bool:
    """16-bit operands of one dtype with an fp32 result: the products CUDA runs as fp32-output GEMMs."""
    return a.dtype == b.dtype and a.dtype in HALF and acc == torch.float32


def native(a: torch.Tensor, b: torch.Tensor, acc: torch.dtype) -> bool:
    """Whether a @ b runs as one fp32-output GEMM of 16-bit operands (CUDA)."""
    return a.device.type == "cuda" and half_pair(a, b, acc)


def product(a: torch.Tensor, b: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """a @ b in acc, 16-bit operands of one dtype on CUDA (the caller checked `native`)."""
    return torch.mm(a, b, out_dtype=acc)


def add_product(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """out += a @ b, out in fp32, 16-bit operands of one dtype on CUDA (the caller checked `native`)."""
    torch.addmm(out, a, b, out_dtype=out.dtype, out=out)


def head_logits(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, t: LogitTransform, acc: torch.dtype):
    """(z' = softcap(scale (h W^T + b)) * inv_tau in acc, tanh of the softcap or None) of one chunk of rows."""
    if not native(h, w, acc):
        return linear_torch.logits(h, w, b, t, acc, row_blocks=False)
    z = product(h, w.t(), acc)
    if b is not None:
        z = z + b.to(acc)
    z = z * t.logit_scale
    th = None if t.softcap is None else torch.tanh(z / t.softcap)
    return (z if th is None else t.softcap * th) * t.inv_tau, th


def head_grads(d: torch.Tensor, w: torch.Tensor, h: torch.Tensor, dh: torch.Tensor | None, dw: torch.Tensor | None,
               db: torch.Tensor | None) -> None:
    """dh += d W, dw += d^T h, db += sum_rows d (each None when not needed; all in d's dtype) for a chunk's gradient
    tile d, rounded to the head's dtype first when the head and the hidden states are 16-bit of one dtype."""
    acc = d.dtype
    if db is not None:
        db += d.sum(0)
    if native(h, w, acc):
        d16 = d.to(w.dtype)
        if dh is not None:
            add_product(dh, d16, w)
        if dw is not None:
            add_product(dw, d16.t(), h)
        return
    if half_pair(h, w, acc):   # the CUDA branch's rounding, so that every device gives its numbers
        d = d.to(w.dtype).to(acc)
    if dh is not None:
        for v0, v1, wb in linear_torch._weight_blocks(w, acc):
            dh.addmm_(d[:, v0:v1], wb)
    if dw is not None:
        dw.addmm_(d.t(), h.to(acc))
