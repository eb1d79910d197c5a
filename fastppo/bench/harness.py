"""Measure one op at one shape on one side (fastppo, eager or a peer library): bytes moved, FLOPs,
launches and their grid sizes, peak live memory of forward + backward. Exact on any machine: Triton
kernels (fastppo's and the peers') run in Triton's interpreter on CPU; large shapes run on fake
tensors (`dry_run`), where everything but the Triton kernels' bytes and FLOPs is counted directly and
those come from a fit on small shapes (`LinearModel`)."""

from __future__ import annotations

import contextlib
import os

import numpy as np
import torch
from torch.utils._python_dispatch import _disable_current_modes

from ..kernels.launches import count_launches, recording_fake_launches
from . import peers
from .counters import AnswerHostSyncs, EagerTraffic, PeakMemory, TritonLaunches, hide_interpreter_copies
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
    outs = spec.sides[side](inputs)
    if spec.has_backward and outs:
        with _disable_current_modes():
            grads = [torch.full_like(o, spec.upstream) for o in outs]
        torch.autograd.backward(list(outs), grads)


def _leaves(inputs):
    return [t for t in inputs.values() if isinstance(t, torch.Tensor) and t.requires_grad]


def make_step(spec: OpSpec, side: str, inputs, mode: str = "full"):
    """A callable running `mode` ('forward' or 'full' = forward + backward) of one side, resetting
    the leaves' gradients first; used for timing (pytest-benchmark, CUDA do_bench)."""
    fn = spec.sides[side]
    leaves = _leaves(inputs)

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
    fn = spec.sides[side]
    leaves = _leaves(inputs)

    def setup():
        for t in leaves:
            t.grad = None
        outs = list(fn(inputs))
        return (outs, [torch.full_like(o, spec.upstream) for o in outs]), {}

    def target(outs, grads):
        torch.autograd.backward(outs, grads)

    return setup, target


KERNEL_KEYS = ("bytes", "requested_bytes", "flops")


def count(spec: OpSpec, shape: dict, side: str, dtype=torch.bfloat16, device="cpu", dry_run=False) -> dict:
    """Counts of forward + backward of `side` at `shape`:
    eager_bytes / eager_flops / eager_launches / eager_roofline_s: the eager PyTorch ops (dispatch mode);
    kernels: {kernel name: launches, programs (summed over its launches), bytes (unique addresses loaded
        + stored per launch: the DRAM traffic when data shared by several programs is reused on chip;
        skipped rows move nothing), requested_bytes (every access), flops (tl.dot)} of the Triton
        launches, counted in Triton's interpreter;
    launches (eager ops + Triton launches); peak_bytes: peak live tensor memory; host_syncs: device
    values read on the host (`.item()`, `if tensor:`);
    bytes / requested_bytes / flops: the eager and kernel parts added.
    `dry_run=True`: on fake tensors (no memory, any shape), Triton launches recorded but not run:
    everything but the kernels' bytes and FLOPs, which stay 0 (except the modelled ones: linear_cost.py)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from .linear_cost import valid_rows
    from .ops import n_valid

    fake = FakeTensorMode() if dry_run else contextlib.nullcontext()
    fake_io = recording_fake_launches() if dry_run else contextlib.nullcontext()
    triton = TritonLaunches(dry_run=dry_run)
    with fake:
        inputs = spec.make(shape, dtype, device)
        with valid_rows(n_valid(shape) if "N" in shape else None), _labels_unchecked(), peers.as_on_gpu(), \
                hide_interpreter_copies(), triton.count(), \
                fake_io, count_launches() as recorded, AnswerHostSyncs() if dry_run else contextlib.nullcontext(), \
                EagerTraffic() as eager, PeakMemory() as peak:
            _run(spec, side, inputs)
    kernels: dict = {}
    # fastppo's launchers also record the tensors each launch reads and writes (kernels/launches.py): their
    # size bounds the unique bytes from above; kept per kernel as io_bytes when every launch recorded it
    io = [r.io_bytes for r in recorded.log] if len(recorded.log) == len(triton.log) else None
    for i, launch in enumerate(triton.log):
        k = kernels.setdefault(launch["kernel"], dict.fromkeys(("launches", "programs", *KERNEL_KEYS), 0))
        if "model_bytes" in launch:    # bench/linear_cost.py: the kernel's per-launch model, summed
            k["model_bytes"] = k.get("model_bytes", 0) + launch["model_bytes"]
            k["model_flops"] = k.get("model_flops", 0) + launch["model_flops"]
        if io is not None:
            k["io_bytes"] = k.get("io_bytes", 0) + io[i]
        k["launches"] += 1
        k["programs"] += launch["programs"]
        k["bytes"] += launch["loaded_bytes"] + launch["stored_bytes"]
        k["requested_bytes"] += launch["requested_bytes"]
        k["flops"] += launch["flops"]
    out = {"host_syncs": eager.host_syncs, "eager_bytes": eager.bytes, "eager_flops": eager.flops,
           "eager_launches": eager.launches, "eager_roofline_s": dict(eager.roofline_s), "kernels": kernels,
           "launches": eager.launches + len(triton.log), "peak_bytes": peak.peak}
    return with_totals(out)


def with_totals(c: dict) -> dict:
    c["bytes"] = c["eager_bytes"] + sum(k["bytes"] for k in c["kernels"].values())
    c["requested_bytes"] = c["eager_bytes"] + sum(k["requested_bytes"] for k in c["kernels"].values())
    c["flops"] = c["eager_flops"] + sum(k["flops"] for k in c["kernels"].values())
    return c


class LinearModel:
    """values = features(shape) . coef, fitted exactly on measured shapes and checked on held-out ones.
    `measured`: [(shape, {key: value})]."""

    def __init__(self, features, measured: list[tuple[dict, dict]], name: str = ""):
        k = len(features(measured[0][0]))
        if len(measured) <= k:
            raise ValueError(f"{name}: need more than {k} measured shapes to fit and check")
        self.features = features
        self.keys = list(measured[0][1])
        X = np.array([features(s) for s, _ in measured], dtype=np.float64)
        Y = np.array([[c[key] for key in self.keys] for _, c in measured], dtype=np.float64)
        self.coef, *_ = np.linalg.lstsq(X[:k], Y[:k], rcond=None)
        pred = X @ self.coef
        self.residuals = pred - Y                       # [shape, key]
        self.max_rel_residual = float(np.max(np.abs(self.residuals) / np.maximum(np.abs(Y), 1.0)))

    def predict(self, shape: dict) -> dict:
        y = np.array(self.features(shape), dtype=np.float64) @ self.coef
        return {k: int(round(v)) for k, v in zip(self.keys, y)}
