"""Counts kernel launches by name: every launcher records each launch it makes, so tests can
prove the Triton path ran and benchmarks can report launches per op."""

import collections
import contextlib

_counts: collections.Counter = collections.Counter()


def record_launch(name: str) -> None:
    _counts[name] += 1


@contextlib.contextmanager
def count_launches():
    """Yields a Counter of the launches made inside the block."""
    before = collections.Counter(_counts)
    seen = collections.Counter()
    try:
        yield seen
    finally:
        seen.update(_counts - before)
