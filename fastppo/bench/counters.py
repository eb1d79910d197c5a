"""Exact counters of what decides GPU speed, measurable on any machine (docs/design.md §5).

- `KernelTraffic`: bytes each Triton kernel loads and stores, counted by wrapping the Triton
  interpreter's masked load/store (only lanes whose mask is true count), needs TRITON_INTERPRET=1.
- `EagerTraffic`: bytes every eager PyTorch op reads and writes (sum of its input and output
  tensors; views and allocations move nothing), the number of ops, i.e. kernel launches on a GPU,
  and the FLOPs of its matrix products.
- `TritonLaunches`: one record per Triton launch run in the interpreter: kernel name, programs
  (grid size), the unique bytes it loads and stores (each address once per launch: its DRAM traffic
  when data that several programs share is reused on chip, and what skipped rows save), the bytes its
  loads and stores request (every access), and its `tl.dot` FLOPs. `dry_run=True` records the
  launches (name, grid) without running them: the launch geometry of a large shape, e.g. on fake tensors;
  kernels with a per-launch model (bench/linear_cost.py, inside its `valid_rows`) also get their bytes and
  FLOPs from it there (and `model_bytes` / `model_flops` beside the counted ones when they run).
- `PeakMemory`: peak bytes of tensor storage allocated inside the block and alive at once
  (storages that existed before the block are not counted).
"""

from __future__ import annotations

import collections
import contextlib
import inspect
import math

import numpy as np
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

# Ops that copy a device value to the host: a GPU host sync.
_SYNC_OPS = {"_local_scalar_dense", "is_nonzero"}
# Ops that allocate or only describe memory: no bytes move.
_FREE_OPS = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "set_", "lift_fresh",
             "_to_copy_noop", "resize_", "detach", "alias", "_local_scalar_dense", "is_nonzero",
             # shape / device queries (dispatched under FakeTensorMode)
             "device", "dim", "size", "stride", "numel", "sym_size", "sym_stride", "sym_numel",
             "sym_storage_offset", "storage_offset", "is_contiguous", "layout"}


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


class TritonLaunches:
    """Records every Triton launch made in the interpreter inside `count()` (see the module doc).
    `log`: list of dicts with kernel, programs, loaded_bytes, stored_bytes (unique addresses),
    requested_bytes (every access), flops (2 M N K per tl.dot)."""

    def __init__(self, dry_run: bool = False):
        self.dry_run = dry_run
        self.log: list[dict] = []
        self._cur = None

    class _Touched:
        """Which bytes of a launch's tensor arguments were accessed: one flat bitmap over their storages
        (O(accesses) to update, whatever the reuse), holding each element's size at its first byte."""

        def __init__(self, tensors):
            storages = {}
            for t in tensors:
                st = t.untyped_storage()
                storages[st.data_ptr()] = max(storages.get(st.data_ptr(), 0), st.nbytes())
            self.starts = np.array(sorted(storages), dtype=np.uint64)
            sizes = np.array([storages[int(p)] for p in self.starts], dtype=np.int64)
            self.base = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
            self.ends = self.starts + sizes.astype(np.uint64)
            self.bitmap = np.zeros(int(sizes.sum()), dtype=np.uint8)

        def add(self, addrs, size):
            addrs = addrs.astype(np.uint64)
            region = np.searchsorted(self.starts, addrs, side="right") - 1
            if addrs.size and (region.min() < 0 or np.any(addrs >= self.ends[region])):
                raise RuntimeError("a Triton kernel accessed memory outside its tensor arguments")
            self.bitmap[self.base[region] + (addrs - self.starts[region]).astype(np.int64)] = size

        @property
        def bytes(self):
            return int(self.bitmap.sum(dtype=np.int64))

    @contextlib.contextmanager
    def count(self):
        from triton.runtime.interpreter import GridExecutor, InterpreterBuilder

        orig = (InterpreterBuilder.create_masked_load, InterpreterBuilder.create_masked_store,
                InterpreterBuilder.create_dot, GridExecutor.__call__)
        rec = self

        def access(kind, ptrs, mask):
            if rec._cur is None:
                return
            size = ptrs.get_element_ty().primitive_bitwidth // 8
            addrs = np.asarray(ptrs.data)[np.asarray(mask.data, dtype=bool)]
            rec._cur[kind].add(addrs.ravel(), size)
            rec._cur["requested_bytes"] += addrs.size * size

        def load(builder, ptrs, mask, other, *args):
            access("loads", ptrs, mask)
            return orig[0](builder, ptrs, mask, other, *args)

        def store(builder, ptrs, value, mask, *args):
            access("stores", ptrs, mask)
            return orig[1](builder, ptrs, value, mask, *args)

        def dot(builder, a, b, d, *args):
            if rec._cur is not None:
                *batch, m, k = a.data.shape
                rec._cur["flops"] += 2 * math.prod(batch) * m * k * b.data.shape[-1]
            return orig[2](builder, a, b, d, *args)

        def call(executor, *args, **kwargs):
            argspec = inspect.getfullargspec(executor.fn)
            kept = {k: v for k, v in kwargs.items() if k in argspec.args or k in argspec.kwonlyargs}
            grid = executor.grid
            if callable(grid):
                grid = grid(inspect.getcallargs(executor.fn, *args, **kept))
            grid = (grid,) if isinstance(grid, int) else tuple(grid)
            tensors = [a for a in (*args, *kept.values()) if isinstance(a, torch.Tensor)]
            from .linear_cost import launch_cost

            model = launch_cost(executor.fn.__name__, inspect.getcallargs(executor.fn, *args, **kept))
            rec._cur = {"kernel": executor.fn.__name__, "programs": math.prod(int(g) for g in grid),
                        "loads": None, "stores": None, "requested_bytes": 0, "flops": 0}
            if not rec.dry_run:
                rec._cur["loads"], rec._cur["stores"] = self._Touched(tensors), self._Touched(tensors)
            try:
                if not rec.dry_run:
                    return orig[3](executor, *args, **kwargs)
            finally:
                cur, rec._cur = rec._cur, None
                entry = {"kernel": cur["kernel"], "programs": cur["programs"],
                         "loaded_bytes": cur["loads"].bytes if cur["loads"] else 0,
                         "stored_bytes": cur["stores"].bytes if cur["stores"] else 0,
                         "requested_bytes": cur["requested_bytes"], "flops": cur["flops"]}
                if model is not None:   # a modelled kernel (bench/linear_cost.py): its exact counts, run or not
                    entry["model_bytes"], entry["model_flops"] = model
                    if rec.dry_run:
                        entry.update(loaded_bytes=model[0], requested_bytes=model[0], flops=model[1])
                self.log.append(entry)

        InterpreterBuilder.create_masked_load, InterpreterBuilder.create_masked_store = load, store
        InterpreterBuilder.create_dot, GridExecutor.__call__ = dot, call
        try:
            yield self
        finally:
            (InterpreterBuilder.create_masked_load, InterpreterBuilder.create_masked_store,
             InterpreterBuilder.create_dot, GridExecutor.__call__) = orig


_active_eager: list = []


def charge_eager(name: str, moved_bytes: int, flops: int = 0) -> None:
    """Count one op that ran outside the dispatcher's view (e.g. a GPU-only op emulated on CPU)."""
    for mode in _active_eager:
        mode.add(name, moved_bytes, flops)


def _fastppo_body(mode, func, args, kwargs):
    """A torch.ops.fastppo op (fastppo.library) runs its Python body under `mode`, so the modes see the
    eager ops and allocations inside it (its kernels are counted by their launchers), not one opaque op."""
    from torch._library.custom_ops import OPDEFS

    with mode:
        return OPDEFS[func._schema.name]._init_fn(*args, **(kwargs or {}))


class EagerTraffic(TorchDispatchMode):
    """Bytes read + written by each eager op, the op count (launches on a GPU), the FLOPs of its
    matrix products (torch.utils.flop_counter's formulas) and `roofline_s[gpu]`: the sum over ops of
    max(bytes / HBM bandwidth, FLOPs / tensor-core peak) (an eager op uses the whole GPU)."""

    def __init__(self):
        super().__init__()
        from torch.utils.flop_counter import flop_registry

        from .roofline import GPUS

        self._flops = flop_registry
        self._gpus = GPUS
        self.bytes = 0
        self.launches = 0
        self.flops = 0
        self.roofline_s = {gpu: 0.0 for gpu in GPUS}
        self.per_op = collections.Counter()
        self.host_syncs = 0

    def __enter__(self):
        _active_eager.append(self)
        return super().__enter__()

    def __exit__(self, *exc):
        _active_eager.remove(self)
        return super().__exit__(*exc)

    def add(self, name, moved, flops):
        self.bytes += moved
        self.launches += 1
        self.flops += flops
        self.per_op[name] += moved
        for gpu, spec in self._gpus.items():
            self.roofline_s[gpu] += max(moved / spec["bandwidth_Bps"], flops / spec["bf16_flops"])

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "fastppo":
            return _fastppo_body(self, func, args, kwargs)
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if name in _SYNC_OPS:
            self.host_syncs += 1
        if func.is_view or name in _FREE_OPS:
            return out
        moved = sum(tensor_bytes(t) for t in _tensors((args, kwargs)))
        moved += sum(tensor_bytes(t) for t in _tensors(out))
        formula = self._flops.get(func.overloadpacket)
        if formula is None and name.endswith("_"):   # an in-place product (addmm_, baddbmm_): its out-of-place formula
            formula = self._flops.get(getattr(torch.ops.aten, name[:-1], None))
        flops = int(formula(*args, **kwargs, out_val=out)) if formula is not None else 0
        if name == "matmul" and args[0].dim() == args[1].dim() == 2:   # matmul(out=) reaches dispatch undecomposed
            flops = 2 * args[0].shape[0] * args[0].shape[1] * args[1].shape[1]
        self.add(name, moved, flops)
        return out


class AnswerHostSyncs(TorchDispatchMode):
    """On fake tensors a host sync (`.item()`, `if tensor:`) has no value to return: answer 1 / True,
    which takes the general path of the code that asks (e.g. `if grad_output != 1.0: scale`)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "fastppo":
            return _fastppo_body(self, func, args, kwargs)
        if func.overloadpacket.__name__ in _SYNC_OPS:
            return True if args[0].dtype == torch.bool or func.overloadpacket.__name__ == "is_nonzero" else 1
        return func(*args, **(kwargs or {}))


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
        inputs = {t.untyped_storage()._cdata for t in _tensors((args, kwargs or {}))}
        out = func(*args, **(kwargs or {}))
        self._update()
        for t in _tensors(out):
            s = t.untyped_storage()
            key = s._cdata                  # the storage itself (fake tensors have no data pointer)
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
