"""Exact counters of what decides GPU speed, measurable on any machine (DESIGN.md §5).

- `KernelTraffic`: bytes each Triton kernel loads and stores, counted by wrapping the Triton
  interpreter's masked load/store (only lanes whose mask is true count), needs TRITON_INTERPRET=1.
- `EagerTraffic`: bytes every eager PyTorch op reads and writes (sum of its input and output
  tensors; views and allocations move nothing) and the number of ops, i.e. kernel launches on a GPU.
- `PeakMemory`: peak bytes of tensor storage allocated inside the block and alive at once
  (storages that existed before the block are not counted).
"""

from __future__ import annotations

import collections
import contextlib

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

# Ops that allocate or only describe memory: no bytes move.
_FREE_OPS = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "set_", "lift_fresh",
             "_to_copy_noop", "resize_", "detach", "alias", "_local_scalar_dense", "is_nonzero"}


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class KernelTraffic:
    """Counts bytes loaded / stored by Triton kernels run in the interpreter."""

    def __init__(self):
        self.loaded = 0
        self.stored = 0

    @property
    def total(self):
        return self.loaded + self.stored

    @contextlib.contextmanager
    def count(self):
        from triton.runtime.interpreter import InterpreterBuilder

        orig_load = InterpreterBuilder.create_masked_load
        orig_store = InterpreterBuilder.create_masked_store
        counter = self

        def elem_bytes(ptrs):
            return ptrs.get_element_ty().primitive_bitwidth // 8

        def load(builder, ptrs, mask, other, *args):
            counter.loaded += int(mask.data.sum()) * elem_bytes(ptrs)
            return orig_load(builder, ptrs, mask, other, *args)

        def store(builder, ptrs, value, mask, *args):
            counter.stored += int(mask.data.sum()) * elem_bytes(ptrs)
            return orig_store(builder, ptrs, value, mask, *args)

        InterpreterBuilder.create_masked_load = load
        InterpreterBuilder.create_masked_store = store
        try:
            yield self
        finally:
            InterpreterBuilder.create_masked_load = orig_load
            InterpreterBuilder.create_masked_store = orig_store


def _fastppo_body(mode, func, args, kwargs):
    """A torch.ops.fastppo op (fastppo.library) runs its Python body under `mode`, so the modes see the
    eager ops and allocations inside it (its kernels are counted by their launchers), not one opaque op."""
    from torch._library.custom_ops import OPDEFS

    with mode:
        return OPDEFS[func._schema.name]._init_fn(*args, **(kwargs or {}))


class EagerTraffic(TorchDispatchMode):
    """Bytes read + written by each eager op and the op count (launches on a GPU)."""

    def __init__(self):
        super().__init__()
        self.bytes = 0
        self.launches = 0
        self.per_op = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "fastppo":
            return _fastppo_body(self, func, args, kwargs)
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if func.is_view or name in _FREE_OPS:
            return out
        moved = sum(tensor_bytes(t) for t in _tensors((args, kwargs or {})))
        moved += sum(tensor_bytes(t) for t in _tensors(out))
        self.bytes += moved
        self.launches += 1
        self.per_op[name] += moved
        return out


class PeakMemory(TorchDispatchMode):
    """Peak live bytes of storages created inside the block (freed ones stop counting)."""

    def __init__(self):
        super().__init__()
        self._live: dict = {}
        self.peak = 0

    def _update(self):
        dead = [k for k, (ref, _) in self._live.items() if ref.expired()]
        for k in dead:
            del self._live[k]
        self.peak = max(self.peak, sum(n for _, n in self._live.values()))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "fastppo":
            return _fastppo_body(self, func, args, kwargs)
        inputs = {t.untyped_storage().data_ptr() for t in _tensors((args, kwargs or {}))}
        out = func(*args, **(kwargs or {}))
        self._update()
        for t in _tensors(out):
            s = t.untyped_storage()
            key = s.data_ptr()
            if key in inputs or key in self._live or s.nbytes() == 0:   # views, in-place ops
                continue
            self._live[key] = (StorageWeakRef(s), s.nbytes())
        self._update()
        return out


@contextlib.contextmanager
def hide_interpreter_copies():
    """The Triton interpreter copies every tensor argument to a host buffer and back around each
    launch: torch ops that a GPU launch does not do. Hide them from the dispatch-mode counters."""
    from torch.utils._python_dispatch import _disable_current_modes
    from triton.runtime.interpreter import GridExecutor

    orig = GridExecutor.__call__

    def call(self, *args, **kwargs):
        with _disable_current_modes():
            return orig(self, *args, **kwargs)

    GridExecutor.__call__ = call
    try:
        yield
    finally:
        GridExecutor.__call__ = orig


class DotFlops:
    """FLOPs of the `tl.dot` tile products of Triton kernels run in the interpreter: 2 M N K per product
    of an [M, K] and a [K, N] tile, as a GPU's tensor cores do them (masked lanes included, so a kernel is
    charged for whole tiles). Needs TRITON_INTERPRET=1."""

    def __init__(self):
        self.flops = 0

    @contextlib.contextmanager
    def count(self):
        from triton.runtime.interpreter import InterpreterBuilder

        orig = InterpreterBuilder.create_dot
        counter = self

        def dot(builder, a, b, d, *args):
            shape_a, shape_b = a.data.shape, b.data.shape
            batch = 1
            for n in shape_a[:-2]:
                batch *= int(n)
            counter.flops += 2 * batch * int(shape_a[-2]) * int(shape_a[-1]) * int(shape_b[-1])
            return orig(builder, a, b, d, *args)

        InterpreterBuilder.create_dot = dot
        try:
            yield self
        finally:
            InterpreterBuilder.create_dot = orig
