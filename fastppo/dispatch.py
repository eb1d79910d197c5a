"""The one dispatch seam: (op, backend) -> the module that implements it.

Every op's autograd Function asks `ops(op, backend)` for its launchers; the Triton launchers
(fastppo.kernels.*) and their PyTorch twins (one CPU fallback per op) share each op's interface.
fastppo.reference is not in the table: it is the test oracle, never the code an op runs."""

from __future__ import annotations

import importlib

from .backend import backend_for

TABLE = {
    ("logprobs", "triton"): "fastppo.kernels.logprobs",
    ("logprobs", "torch"): "fastppo._torch_ops",
    ("full_kl", "triton"): "fastppo.kernels.full_kl",
    ("full_kl", "torch"): "fastppo._torch_ops",
    ("linear", "triton"): "fastppo.kernels.linear",
    ("linear", "torch"): "fastppo._linear_torch",
    ("kl_penalty", "triton"): "fastppo.kernels.kl",
    ("kl_penalty", "torch"): "fastppo._torch_terms",
    ("loss_agg", "triton"): "fastppo.kernels.loss_agg",
    ("loss_agg", "torch"): "fastppo._torch_terms",
    ("gae", "triton"): "fastppo.kernels.gae",
    ("gae", "torch"): "fastppo._torch_terms",
}
OPS = tuple(sorted({op for op, _ in TABLE}))


def ops(op: str, backend: str):
    """The launcher module of `op` on `backend` ('triton' or 'torch')."""
    try:
        name = TABLE[(op, backend)]
    except KeyError:
        raise ValueError(f"no implementation of op {op!r} on backend {backend!r}; ops: {OPS}") from None
    return importlib.import_module(name)


def ops_for(op: str, *tensors):
    """(launcher module, backend) for `op` on these tensors (backend chosen by fastppo.backend)."""
    backend = backend_for(*tensors)
    return ops(op, backend), backend
