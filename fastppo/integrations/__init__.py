"""Drop fastppo's ops into TRL, verl and OpenRLHF by rebinding their entry points.

    import fastppo.integrations as fi
    handle = fi.patch("trl")          # before building the trainer
    ...                               # train as usual
    handle.undo()                     # or: with fi.patch("trl"): ...

Each replacement keeps the host's signature, defaults, return dtypes/shapes and semantics; the
math is always one of fastppo's public ops (or a thin composition of them). A call the ops cannot
serve yet (an option fastppo lacks) goes to the host's original and is counted in
`handle.stats.delegated`. See the target modules for what each replaces.
"""

from __future__ import annotations

import importlib
from collections.abc import Collection
from importlib.metadata import PackageNotFoundError

from ._patching import _ACTIVE, PatchHandle

TARGETS = ("trl", "verl", "openrlhf")


def _adapter(target: str):
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    return importlib.import_module(f"{__name__}.{target}")


def entry_points(target: str) -> list[str]:
    """Names of the entry points `patch(target)` replaces (the values `ops=` accepts)."""
    return [ep.name for ep in _adapter(target).entry_points()]


def patch(target: str, *, ops: Collection[str] | None = None) -> PatchHandle:
    """Rebind `target`'s entry points ("trl" | "verl" | "openrlhf") to fastppo ops in every module
    that imported them by name. `ops` (names from `entry_points(target)`) limits what is replaced.

    Idempotent: patching an already patched target returns the same handle (installing any entry
    points of `ops` not yet replaced). Raises ImportError when the package is missing and
    RuntimeError naming the supported versions when the installed one is not supported.
    Patch before the trainer / engine is built: a host that copied a function into an object
    (verl binds its entropy function when the engine is built) keeps the copy it made."""
    adapter = _adapter(target)
    try:
        version = adapter.installed_version()
    except PackageNotFoundError as e:
        raise ImportError(f"fastppo.integrations.patch({target!r}): {target} is not installed "
                          f"(pip install 'fastppo[{target}]'; supported: {adapter.SUPPORTED})") from e
    if not adapter.supported(version):
        raise RuntimeError(f"fastppo.integrations.patch({target!r}): installed {target} {version} is not supported; "
                           f"supported versions: {adapter.SUPPORTED}")
    eps = adapter.entry_points()
    names = [ep.name for ep in eps]
    if ops is not None:
        ops = [ops] if isinstance(ops, str) else list(ops)
        unknown = [o for o in ops if o not in names]
        if unknown:
            raise ValueError(f"ops {unknown} are not entry points of {target}; choose from {names}")
        eps = [ep for ep in eps if ep.name in ops]
    handle = _ACTIVE.get(target)
    if handle is None:
        handle = PatchHandle(target, version)
        _ACTIVE[target] = handle
    for ep in eps:
        handle._install(ep)
    return handle


__all__ = ["PatchHandle", "TARGETS", "entry_points", "patch"]
