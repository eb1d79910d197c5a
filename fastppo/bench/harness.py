"""Measure one op at one shape on one side (fastppo or eager): bytes moved, launches, peak live
memory of forward + backward. Exact on any machine: the fastppo side runs the real kernels in
Triton's interpreter on CPU (or on the GPU, where bytes come from the fitted model instead)."""

from __future__ import annotations

import contextlib
import os

import numpy as np
import torch
from torch.utils._python_dispatch import _disable_current_modes

from ..kernels.launches import count_launches
from .counters import EagerTraffic, KernelTraffic, PeakMemory, hide_interpreter_copies
from .ops import OpSpec


@contextlib.contextmanager
def _labels_unchecked():
    """Mirror CUDA: no host-side label check (it would be a sync there)."""
    old = os.environ.get("FASTPPO_CHECK_LABELS")
    os.environ["FASTPPO_CHECK_LABELS"] = "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("FASTPPO_CHECK_LABELS")
        else:
            os.environ["FASTPPO_CHECK_LABELS"] = old


def _run(spec: OpSpec, side: str, inputs):
    fn = spec.fastppo if side == "fastppo" else spec.eager
    outs = fn(inputs)
    if spec.has_backward and outs:
        with _disable_current_modes():
            grads = [torch.full_like(o, 0.5) for o in outs]
        torch.autograd.backward(list(outs), grads)


def make_step(spec: OpSpec, side: str, inputs, mode: str = "full"):
    """A callable running `mode` ('forward' or 'full' = forward + backward) of one side, resetting
    the leaves' gradients first; used for timing (pytest-benchmark, CUDA do_bench)."""
    fn = spec.fastppo if side == "fastppo" else spec.eager
    leaves = [t for t in inputs.values() if isinstance(t, torch.Tensor) and t.requires_grad]

    def step():
        for t in leaves:
            t.grad = None
        if mode == "forward":
            with torch.no_grad():
                return fn(inputs)
        return _run(spec, side, inputs)

    return step


def make_backward(spec: OpSpec, side: str, inputs):
    """(setup, target) for timing the backward pass alone: setup runs the forward pass and returns
    the outputs and upstream gradients; target back-propagates them."""
    fn = spec.fastppo if side == "fastppo" else spec.eager
    leaves = [t for t in inputs.values() if isinstance(t, torch.Tensor) and t.requires_grad]

    def setup():
        for t in leaves:
            t.grad = None
        outs = list(fn(inputs))
        return (outs, [torch.full_like(o, 0.5) for o in outs]), {}

    def target(outs, grads):
        torch.autograd.backward(outs, grads)

    return setup, target


def count(spec: OpSpec, shape: dict, side: str, dtype=torch.bfloat16, device="cpu") -> dict:
    """Counts of forward + backward on `side`:
    bytes: tensor bytes every launch reads and writes (eager ops and Triton kernels alike: the DRAM
        traffic when tiles shared by several programs are reused on chip);
    requested_bytes: for Triton kernels, what their loads and stores ask for (interpreter count, L2
        hits included; equal to `bytes` for the streaming row kernels); eager ops as in `bytes`;
    launches; peak_bytes: peak live tensor memory."""
    inputs = spec.make(shape, dtype, device)
    interp = side == "fastppo" and device == "cpu"
    kernels = KernelTraffic()
    with _labels_unchecked(), (hide_interpreter_copies() if interp else contextlib.nullcontext()), \
            (kernels.count() if interp else contextlib.nullcontext()), count_launches() as launched, \
            EagerTraffic() as eager, PeakMemory() as peak:
        _run(spec, side, inputs)
    return {"bytes": launched.io_bytes + eager.bytes,
            "requested_bytes": (kernels.total if interp else launched.io_bytes) + eager.bytes,
            "launches": sum(launched.values()) + eager.launches, "peak_bytes": peak.peak}


class LinearModel:
    """counts = features(shape) . coef, fitted exactly on measured shapes and checked on held-out ones."""

    def __init__(self, spec: OpSpec, measured: list[tuple[dict, dict]]):
        k = len(spec.features(measured[0][0]))
        if len(measured) <= k:
            raise ValueError(f"{spec.name}: need more than {k} measured shapes to fit and check")
        self.spec = spec
        self.keys = list(measured[0][1])
        X = np.array([spec.features(s) for s, _ in measured], dtype=np.float64)
        Y = np.array([[c[key] for key in self.keys] for _, c in measured], dtype=np.float64)
        self.coef, *_ = np.linalg.lstsq(X[:k], Y[:k], rcond=None)
        pred = X @ self.coef
        self.max_rel_residual = float(np.max(np.abs(pred - Y) / np.maximum(np.abs(Y), 1.0)))

    def predict(self, shape: dict) -> dict:
        y = np.array(self.spec.features(shape), dtype=np.float64) @ self.coef
        return {k: int(round(v)) for k, v in zip(self.keys, y)}
