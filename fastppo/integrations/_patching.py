"""Rebinding host entry points: find every module that holds the original object, swap in the
replacement, remember what was swapped so it can be undone.

A host function is usually imported by name into several modules (`from trl.trainer.utils import
selective_log_softmax`), so patching the defining module alone reaches only some callers. `rebind`
scans `sys.modules` for attributes that *are* the original object (identity, not name) and
replaces each one; modules imported after the patch get the replacement only if they import it
from a module that was already patched (so: patch before building the trainer / engine).
"""

from __future__ import annotations

import functools
import inspect
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass
class Slot:
    """One place that held the original: `holder.name` (a module or class attribute) or
    `holder[name]` (a dict entry, e.g. a registry)."""

    holder: Any
    name: str
    is_dict: bool = False
    label: str = ""

    def get(self):
        return self.holder[self.name] if self.is_dict else getattr(self.holder, self.name)

    def set(self, value):
        if self.is_dict:
            self.holder[self.name] = value
        else:
            setattr(self.holder, self.name, value)

    def where(self) -> str:
        owner = self.label or getattr(self.holder, "__name__", type(self.holder).__name__)
        return f"{owner}[{self.name!r}]" if self.is_dict else f"{owner}.{self.name}"


def holders_of(original, extra_slots=(), registries=()) -> list[Slot]:
    """Every module attribute in sys.modules that is `original`, every entry of the given
    (label, dict) registries that is `original`, plus the given extra slots."""
    slots = []
    for mod in list(sys.modules.values()):
        d = getattr(mod, "__dict__", None)
        if not isinstance(d, dict):
            continue
        for name, value in list(d.items()):
            if value is original:
                slots.append(Slot(mod, name))
    for label, reg in registries:
        slots.extend(Slot(reg, k, True, label) for k, v in list(reg.items()) if v is original)
    slots.extend(s for s in extra_slots if s.get() is original)
    return slots


class CallStats:
    """Per entry point: how many calls fastppo served and how many went to the host's original
    (an argument combination fastppo's ops cannot serve yet)."""

    def __init__(self):
        self.served: Counter = Counter()
        self.delegated: Counter = Counter()

    def __repr__(self):
        return f"CallStats(served={dict(self.served)}, delegated={dict(self.delegated)})"


def host_signature_wrapper(original: Callable, name: str, stats: CallStats, serve: Callable, *,
                           sig: inspect.Signature | None = None, call_original: Callable | None = None) -> Callable:
    """A function with the original's name, docstring and signature (so the host's keyword
    arguments and defaults hold). `serve(arguments)` gets the bound arguments by the host's
    parameter names (defaults applied) and returns the result, or NotImplemented to hand the call
    to the original (`call_original`, default `original`)."""
    sig = inspect.signature(original) if sig is None else sig
    call_original = original if call_original is None else call_original

    @functools.wraps(original)
    def replacement(*args, **kwargs):
        bound = sig.bind(*args, **kwargs)
        bound.apply_defaults()
        out = serve(bound.arguments)
        if out is NotImplemented:
            stats.delegated[name] += 1
            return call_original(*args, **kwargs)
        stats.served[name] += 1
        return out

    replacement.__signature__ = sig
    replacement.__fastppo_original__ = original
    return replacement


def entropy_of_logits(logits):
    """Per-row entropy of softmax(logits) (float32; float64 for float64 logits) through
    fastppo.token_logprobs: every host's `entropy_from_logits` needs no label, so a dummy one is given."""
    import torch

    import fastppo

    zeros = torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device)
    return fastppo.token_logprobs(logits, zeros, return_entropy=True)[1]


def compute_dtype(hidden):
    """The dtype a host's LM head projects in: the autocast dtype when autocast is on, else hidden's (TRL's
    `compute_dtype`)."""
    import torch

    dev = hidden.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else hidden.dtype


def in_compute_dtype(x, dt):
    """x's values rounded to the compute dtype dt: the same products as the host's (its operands in dt, fp32
    accumulation). Under autocast (dt narrower than x) the rounded values stay in x's dtype with an identity
    gradient, so the gradient is not rounded to dt on its way back (autograd through x.to(dt) would)."""
    import torch

    if torch.promote_types(x.dtype, dt) == dt:
        return x.to(dt)
    return x + (x.detach().to(dt).to(x.dtype) - x.detach())


def accepts(fn: Callable, keyword: str) -> bool:
    """Whether fastppo's op `fn` takes `keyword` (features land op by op; until one does, the
    adapter hands the calls that need it to the host)."""
    return keyword in inspect.signature(fn).parameters


@dataclass
class EntryPoint:
    """A host entry point: `locate()` returns (defining module, attribute name); `build(original,
    stats)` makes the replacement; `registries` are (label, dict) tables that may hold the original
    by value (verl's policy-loss and advantage-estimator registries)."""

    name: str
    locate: Callable[[], tuple]
    build: Callable[[Any, CallStats], Any]
    registries: tuple = ()


class PatchHandle:
    """What one `fastppo.integrations.patch(...)` call replaced. A context manager; `.undo()` puts
    every original back (idempotent). `.replaced` maps entry point -> list of the places rebound;
    `.stats` counts the calls fastppo served and those delegated to the host."""

    def __init__(self, target: str, version: str):
        self.target = target
        self.version = version
        self.replaced: dict[str, list[str]] = {}
        self.stats = CallStats()
        self._undo: list[tuple[Slot, Any]] = []
        self._replacements: dict[str, Any] = {}
        self.active = True

    def _install(self, ep: EntryPoint):
        if ep.name in self._replacements:
            return
        holder, attr = ep.locate()
        home = Slot(holder, attr)
        original = home.get()
        new = ep.build(original, self.stats)
        slots = holders_of(original, [home], ep.registries)
        seen = set()
        places = []
        for slot in slots:
            key = (id(slot.holder), slot.name, slot.is_dict)
            if key in seen:
                continue
            seen.add(key)
            slot.set(new)
            self._undo.append((slot, original))
            places.append(slot.where())
        self._replacements[ep.name] = new
        self.replaced[ep.name] = places

    def undo(self):
        """Put every original back where it was; a second call does nothing."""
        for slot, original in reversed(self._undo):
            slot.set(original)
        self._undo.clear()
        self._replacements.clear()
        self.replaced.clear()
        self.active = False
        _ACTIVE.pop(self.target, None)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.undo()
        return False

    def __repr__(self):
        return f"PatchHandle({self.target} {self.version}, replaced={sorted(self.replaced)}, {self.stats})"


_ACTIVE: dict[str, PatchHandle] = {}
