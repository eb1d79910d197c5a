"""The registration helper of the `torch.library` ops (namespace `fastppo`, torch.ops.fastppo.*). Every
public op is one, so that torch.compile sees one graph node per op (no graph break) and a CUDA graph can
capture it (no host sync inside). Each op family's module (fastppo.logprobs, .full_kl, .kl_penalty,
.losses, .fused, .linear, .fused_linear, .advantages) registers its ops with `define` directly beside
their bodies, fake implementations and autograd formulas; this module imports no op.

How an op is registered (`define`): a `custom_op` with the fake implementation written beside it.
A body that launches Triton kernels launches them through `torch.library.wrap_triton`, and (as
`torch.library.triton_op` does) the op gets a decomposition under functionalization, so AOTAutograd
and Inductor trace the kernels themselves into their graph instead of an opaque call — for the
"triton" backend only: the PyTorch backend's chunked loops (data-dependent row selection on CPU) stay
one opaque call. Under the Triton interpreter (TRITON_INTERPRET=1) there is no decomposition:
`wrap_triton` returns interpreted kernels unchanged, so tracing the body would hand fake tensors to
the interpreter, which copies its arguments through their storage — torch.compile's failure under the
interpreter (`Cannot access data pointer of Tensor`, or `KeyError(torch.uint64)` from its dtype map).
As an opaque op the kernels only ever see real tensors: one graph, no break, the interpreter's numbers.

Schemas take tensors and primitives. The logits ops take their few options as floats / ints / bools;
the loss and linear ops take their frozen options dataclass as one string, a dict literal (`encode`),
decoded in the body (`decode`), so the schema stays short and readable when options are added. Both
directions are cached: a training loop that calls an op with the same options every step encodes and
parses them once, not per call. The backend chosen by the public
function is an argument, so a compiled graph keeps the choice it was traced with. Absent optional
outputs are empty tensors (schemas cannot return None); stats come back as one tensor, the public
functions build their dict views outside.
"""

import ast
import dataclasses
import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch._library.infer_schema import infer_schema
from torch._library.triton import set_wrap_triton_enabled
from torch._subclasses.functional_tensor import FunctionalTensorMode
from torch.library import custom_op

from .backend import interpreter_enabled

OPAQUE_KERNELS = interpreter_enabled()


@functools.lru_cache(maxsize=512)
def encode(options: Any) -> str:
    """A frozen options dataclass (nested ones included) as the string an op takes: a Python dict literal
    of its fields (floats by repr, so exact). Plain string operations, which torch.compile traces (json
    does not)."""
    items = []
    for field in dataclasses.fields(options):
        value = getattr(options, field.name)
        items.append(repr(field.name) + ": " + (encode(value) if dataclasses.is_dataclass(value) else repr(value)))
    return "{" + ", ".join(items) + "}"


@functools.lru_cache(maxsize=512)
def decode(cls: type, text: str) -> Any:
    """The inverse of `encode` for a flat options dataclass `cls` (the same frozen object for the same text)."""
    return cls(**ast.literal_eval(text))


def define(name: str, fake: Callable, *, kernels: bool, mutates_args: tuple[str, ...] = ()) -> Callable:
    """Register the decorated function as torch.ops.fastppo.<name> (see the module docstring)."""

    def register(fn):
        def eager(*args, **kwargs):
            with set_wrap_triton_enabled(False):   # eager calls launch directly (no HOP dispatch)
                return fn(*args, **kwargs)

        op = custom_op(f"fastppo::{name}", eager, mutates_args=mutates_args, schema=_schema(fn, mutates_args))
        op.register_fake(fake)
        if kernels and not OPAQUE_KERNELS:
            op.register_torch_dispatch(FunctionalTensorMode, _decomposition(fn))
        return op

    return register


def _schema(fn, mutates_args):
    return infer_schema(fn, mutates_args=mutates_args)


def _decomposition(fn):
    """Under functionalization (AOTAutograd, Inductor) run the body itself, so its wrap_triton launches
    become Triton kernels of the graph; the PyTorch backend stays one opaque op."""
    signature = inspect.signature(fn)

    def decompose(mode, op, types, args, kwargs):
        if signature.bind(*args, **kwargs).arguments.get("backend", "triton") != "triton":
            return mode.__torch_dispatch__(op, types, args, kwargs)
        with mode:
            return fn(*args, **kwargs)

    return decompose


def acc_dtype(*xs: torch.Tensor) -> torch.dtype:
    """float32 results, float64 when an input is float64."""
    return torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32


def empty(like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The stand-in for an output that was not asked for (schemas cannot return None)."""
    return like.new_empty((0,), dtype=dtype or like.dtype)


def or_empty(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return empty(like) if t is None else t


def twice(name: str) -> RuntimeError:
    """The error of differentiating a once-differentiable fastppo op twice."""
    return RuntimeError(f"torch.ops.fastppo.{name} is once_differentiable: fastppo cannot differentiate twice "
                        f"(double backward is not implemented)")


def refuse_double_backward(op: Any, name: str) -> None:
    """Backward ops are once_differentiable: differentiating through them raises `twice(name)`."""

    def backward(ctx, *grads):
        raise twice(name)

    op.register_autograd(backward, setup_context=lambda ctx, inputs, output: None)


class Once(torch.autograd.Function):
    """The identity on a gradient, linked to the op's inputs, whose derivative raises `twice`: for backward
    formulas that are not functions of those inputs in torch ops (gradients formed in the forward pass)."""

    @staticmethod
    def forward(ctx, name, grad, *linked):
        ctx.name = name
        return grad.view_as(grad)

    @staticmethod
    def backward(ctx, *grads):
        raise twice(ctx.name)
