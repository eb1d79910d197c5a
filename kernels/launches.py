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

_counts: collections.Counter = collections.Counter()
_io_bytes = [0]
_log: list = []


class Launch(NamedTuple):
    name: str
    io_bytes: int
    programs: int | None       # grid size (product of the grid's dimensions); None when not recorded


def record_launch(name: str, *tensors, grid=None) -> None:
    """Record one launch of `name` that reads / writes `tensors` (views: only the viewed elements)
    on `grid` (a tuple of program counts per grid axis, or an int)."""
    io = sum(t.numel() * t.element_size() for t in tensors if t is not None)
    _counts[name] += 1
    _io_bytes[0] += io
    programs = None if grid is None else (grid if isinstance(grid, int) else math.prod(grid))
    _log.append(Launch(name, io, programs))


class Launches(collections.Counter):
    """Launch counts by kernel name, plus `io_bytes`: the tensor bytes those launches read and write,
    and `log`: one Launch(name, io_bytes, programs) per launch, in launch order."""

    io_bytes = 0
    log: list = []


@contextlib.contextmanager
def count_launches():
    """Yields a Launches counter of the launches made inside the block."""
    before = collections.Counter(_counts)
    io_before = _io_bytes[0]
    log_before = len(_log)
    seen = Launches()
    try:
        yield seen
    finally:
        seen.update(_counts - before)
        seen.io_bytes = _io_bytes[0] - io_before
        seen.log = _log[log_before:]
        del _log[log_before:]
