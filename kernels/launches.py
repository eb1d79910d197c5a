"""Counts kernel launches by name, and the bytes each launch must move at the least: the sizes of
the tensors it reads and writes (the I/O a GPU kernel moves to and from DRAM when tiles that several
programs share are reused on chip, the same model as counting an eager op's inputs and outputs).
Tests use the counts to prove the Triton path ran; benchmarks report launches and I/O per op."""

import collections
import contextlib

_counts: collections.Counter = collections.Counter()
_io_bytes = [0]
_programs: dict = {}


def record_launch(name: str, *tensors, grid=None) -> None:
    """Record one launch of `name` that reads / writes `tensors` (views: only the viewed elements);
    `grid` (a tuple) records how many programs it runs (the largest grid per name is kept)."""
    _counts[name] += 1
    _io_bytes[0] += sum(t.numel() * t.element_size() for t in tensors if t is not None)
    if grid is not None:
        n = 1
        for g in grid:
            n *= int(g)
        _programs[name] = max(_programs.get(name, 0), n)


class Launches(collections.Counter):
    """Launch counts by kernel name, plus `io_bytes`: the tensor bytes those launches read and write,
    and `programs`: the largest grid (programs per launch) by name, for launches that record it."""

    io_bytes = 0
    programs: dict


@contextlib.contextmanager
def count_launches():
    """Yields a Launches counter of the launches made inside the block."""
    before = collections.Counter(_counts)
    io_before = _io_bytes[0]
    programs_before = dict(_programs)
    _programs.clear()
    seen = Launches()
    seen.programs = {}
    try:
        yield seen
    finally:
        seen.update(_counts - before)
        seen.io_bytes = _io_bytes[0] - io_before
        seen.programs = dict(_programs)
        for k, v in programs_before.items():
            _programs[k] = max(v, _programs.get(k, 0))
