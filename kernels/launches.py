"""Counts kernel launches by name, and the bytes each launch must move at the least: the sizes of
the tensors it reads and writes (the I/O a GPU kernel moves to and from DRAM when tiles that several
programs share are reused on chip, the same model as counting an eager op's inputs and outputs).
Tests use the counts to prove the Triton path ran; benchmarks report launches and I/O per op."""

import collections
import contextlib

from torch._subclasses.fake_tensor import is_fake

_counts: collections.Counter = collections.Counter()
_io_bytes = [0]


def record_launch(name: str, *tensors) -> None:
    """Record one launch of `name` that reads / writes `tensors` (views: only the viewed elements).
    Nothing is recorded while torch.compile traces a launcher with fake tensors (no launch happens)."""
    if any(t is not None and is_fake(t) for t in tensors):
        return
    _counts[name] += 1
    _io_bytes[0] += sum(t.numel() * t.element_size() for t in tensors if t is not None)


class Launches(collections.Counter):
    """Launch counts by kernel name, plus `io_bytes`: the tensor bytes those launches read and write."""

    io_bytes = 0


@contextlib.contextmanager
def count_launches():
    """Yields a Launches counter of the launches made inside the block."""
    before = collections.Counter(_counts)
    io_before = _io_bytes[0]
    seen = Launches()
    try:
        yield seen
    finally:
        seen.update(_counts - before)
        seen.io_bytes = _io_bytes[0] - io_before
