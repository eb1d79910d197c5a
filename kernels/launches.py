"""Counts kernel launches by name, the bytes each launch must move at the least (the sizes of the
tensors it reads and writes: the I/O a GPU kernel moves to and from DRAM when tiles that several
programs share are reused on chip, the same model as counting an eager op's inputs and outputs), and
the number of programs (grid size) of each launch: the parallelism the projection charges it by
(a launch with P programs can use at most min(P, SMs) / SMs of the GPU's bandwidth).
Tests use the counts to prove the Triton path ran; benchmarks report launches and I/O per op."""

import collections
import contextlib
import math
from typing import NamedTuple

from torch._subclasses.fake_tensor import is_fake

_counts: collections.Counter = collections.Counter()
_io_bytes = [0]
_log: list = []          # per-launch records, kept only while a count_launches() block is open
_open = [0]
_record_fake = [0]       # > 0 inside recording_fake_launches(): fake-tensor launches are recorded too


class Launch(NamedTuple):
    name: str
    io_bytes: int
    programs: int | None       # grid size (product of the grid's dimensions); None when not recorded


def record_launch(name: str, *tensors, grid=None) -> None:
    """Record one launch of `name` that reads / writes `tensors` (views: only the viewed elements)
    on `grid` (a tuple of program counts per grid axis, or an int). Nothing is recorded while torch.compile
    traces a launcher with fake tensors (no launch happens), except inside `recording_fake_launches()` (the bench's
    dry runs, where the launch is recorded at its real size without running)."""
    if not _record_fake[0] and any(t is not None and is_fake(t) for t in tensors):
        return
    io = sum(t.numel() * t.element_size() for t in tensors if t is not None)
    _counts[name] += 1
    _io_bytes[0] += io
    if _open[0]:
        programs = None if grid is None else (grid if isinstance(grid, int) else math.prod(int(g) for g in grid))
        _log.append(Launch(name, io, programs))


class Launches(collections.Counter):
    """Launch counts by kernel name, plus `io_bytes`: the tensor bytes those launches read and write,
    `log`: one Launch(name, io_bytes, programs) per launch, in launch order, and `programs`: the largest
    grid (programs per launch) by name, for the launches that record it."""

    io_bytes = 0
    log: list = []
    programs: dict = {}


@contextlib.contextmanager
def count_launches():
    """Yields a Launches counter of the launches made inside the block."""
    before = collections.Counter(_counts)
    io_before = _io_bytes[0]
    log_before = len(_log)
    _open[0] += 1
    seen = Launches()
    try:
        yield seen
    finally:
        _open[0] -= 1
        seen.update(_counts - before)
        seen.io_bytes = _io_bytes[0] - io_before
        seen.log = _log[log_before:]
        if not _open[0]:
            _log.clear()
        seen.programs = {}
        for launch in seen.log:
            if launch.programs is not None:
                seen.programs[launch.name] = max(launch.programs, seen.programs.get(launch.name, 0))


@contextlib.contextmanager
def recording_fake_launches():
    """Inside the block, launches given fake tensors are recorded as real ones (their tensors' sizes are known): the
    bench's dry runs at shapes too large to run, whose launch I/O then bounds each kernel's bytes exactly."""
    _record_fake[0] += 1
    try:
        yield
    finally:
        _record_fake[0] -= 1
