"""The benchmarked ops: for each, inputs at a shape, the fastppo call, the eager reference call
(what trainers run today: the reference module's PyTorch math), the traffic floor and FLOPs.

`forward` functions return the tensors to back-propagate through (empty for rollout-time ops).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .. import reference as ref


@dataclass(frozen=True)
class OpSpec:
    name: str
    dims: tuple                       # names of the shape parameters, e.g. ("N", "V")
    make: Callable                    # (shape: dict, dtype, device) -> inputs dict
    fastppo: Callable                 # inputs -> tuple of outputs to backward through
    eager: Callable
    floor_bytes: Callable             # (shape, dtype) -> bytes the op must move at least
    features: Callable                # shape -> monomials the counts are linear in
    flops: Callable = lambda shape, side: 0   # (shape, side) -> floating-point operations
    has_backward: bool = True
    sweep: tuple = ()                 # the large shapes of the report (derived on CPU)
    measure: tuple = ()               # small shapes measured in the interpreter (fit + check)


def _esize(dtype):
    return torch.empty((), dtype=dtype).element_size()


def _logits_inputs(shape, dtype, device):
    N, V = shape["N"], shape["V"]
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(N, V, generator=g) * 2).to(dtype).to(device).requires_grad_()
    labels = torch.randint(0, V, (N,), generator=g).to(device)
    return {"logits": logits, "labels": labels}


def _logprobs_fastppo(inp):
    import fastppo

    return fastppo.token_logprobs(inp["logits"], inp["labels"], return_entropy=True)


def _logprobs_eager(inp):
    return ref.token_logprobs(inp["logits"], inp["labels"], return_entropy=True)


def _ppo_inputs(shape, dtype, device):
    inp = _logits_inputs(shape, dtype, device)
    N = shape["N"]
    B = 4 if N % 4 == 0 else 1
    g = torch.Generator().manual_seed(1)
    inp["logits"] = inp["logits"].detach().view(B, N // B, -1).requires_grad_()
    inp["labels"] = inp["labels"].view(B, N // B)
    inp["old"] = (torch.randn(B, N // B, generator=g) * 0.1 - 7).to(device)
    inp["ref"] = inp["old"] + 0.05
    inp["adv"] = torch.randn(B, N // B, generator=g).to(device)
    inp["mask"] = torch.ones(B, N // B, dtype=torch.bool, device=device)
    return inp


PPO_KW = dict(kl_coef=0.05, kl_kind="low_var_kl", entropy_coef=0.01, clip_high=0.28)


def _ppo_fastppo(inp):
    import fastppo

    out = fastppo.fused_ppo_loss(inp["logits"], inp["labels"], inp["old"], inp["adv"], inp["mask"],
                                 ref_logprobs=inp["ref"], **PPO_KW)
    return (out.loss,)


def _ppo_eager(inp):
    out = ref.fused_ppo_loss(inp["logits"], inp["labels"], inp["old"], inp["adv"], inp["mask"],
                             ref_logprobs=inp["ref"], **PPO_KW)
    return (out.loss,)


def _kl_inputs(shape, dtype, device):
    inp = _logits_inputs(shape, dtype, device)
    inp["ref_logits"] = (inp["logits"].detach().float() + 0.1).to(dtype)
    return inp


def _gae_inputs(shape, dtype, device):
    B, T = shape["B"], shape["T"]
    g = torch.Generator().manual_seed(2)
    return {"r": torch.randn(B, T, generator=g).to(device), "v": torch.randn(B, T, generator=g).to(device),
            "m": (torch.rand(B, T, generator=g) > 0.1).to(device)}


def _gae_fastppo(inp):
    import fastppo

    fastppo.gae(inp["r"], inp["v"], inp["m"], gamma=0.99, lam=0.95)
    return ()


def _gae_eager(inp):
    import fastppo

    with fastppo.use_backend("torch"):      # the per-time-step loop every trainer runs today
        fastppo.gae(inp["r"], inp["v"], inp["m"], gamma=0.99, lam=0.95)
    return ()


def _nv(shape):
    return [shape["N"] * shape["V"], shape["N"], 1]


LOGIT_SWEEP = tuple({"N": n, "V": v} for n in (4096, 16384) for v in (32000, 65536, 128256, 151936))
LOGIT_MEASURE = ({"N": 8, "V": 1024}, {"N": 16, "V": 1024}, {"N": 8, "V": 2048}, {"N": 12, "V": 1536})

OPS = {
    "token_logprobs": OpSpec(
        "token_logprobs", ("N", "V"), _logits_inputs, _logprobs_fastppo, _logprobs_eager,
        floor_bytes=lambda s, dt: 3 * s["N"] * s["V"] * _esize(dt), features=_nv,
        sweep=LOGIT_SWEEP, measure=LOGIT_MEASURE),
    "fused_ppo_loss": OpSpec(
        "fused_ppo_loss", ("N", "V"), _ppo_inputs, _ppo_fastppo, _ppo_eager,
        floor_bytes=lambda s, dt: 3 * s["N"] * s["V"] * _esize(dt), features=_nv,
        sweep=LOGIT_SWEEP, measure=LOGIT_MEASURE),
    "full_kl": OpSpec(
        "full_kl", ("N", "V"), _kl_inputs,
        lambda inp: (__import__("fastppo").full_kl(inp["logits"], inp["ref_logits"]),),
        lambda inp: (ref.full_kl(inp["logits"], inp["ref_logits"]),),
        floor_bytes=lambda s, dt: 5 * s["N"] * s["V"] * _esize(dt), features=_nv,
        sweep=LOGIT_SWEEP, measure=LOGIT_MEASURE),
    "gae": OpSpec(
        "gae", ("B", "T"), _gae_inputs, _gae_fastppo, _gae_eager,
        floor_bytes=lambda s, dt: s["B"] * s["T"] * (4 + 4 + 1 + 4 + 4),
        features=lambda s: [s["B"] * s["T"], s["T"], s["B"], 1], has_backward=False,
        sweep=tuple({"B": b, "T": t} for b in (64, 512) for t in (1024, 8192, 32768)),
        measure=({"B": 2, "T": 64}, {"B": 3, "T": 64}, {"B": 2, "T": 96}, {"B": 3, "T": 128},
                 {"B": 4, "T": 96})),
}



def _linear_inputs(shape, dtype, device):
    N, H, V = shape["N"], shape["H"], shape["V"]
    g = torch.Generator().manual_seed(3)
    return {"hidden": torch.randn(N, H, generator=g).to(dtype).to(device).requires_grad_(),
            "weight": (torch.randn(V, H, generator=g) / H**0.5).to(dtype).to(device).requires_grad_(),
            "labels": torch.randint(0, V, (N,), generator=g).to(device)}


def _linear_fastppo(inp):
    import fastppo

    return fastppo.linear_logprobs(inp["hidden"], inp["weight"], inp["labels"], return_entropy=True)


def _linear_eager(inp):
    return ref.linear_logprobs(inp["hidden"], inp["weight"], inp["labels"], return_entropy=True)


def _nhv(shape):
    N, H, V = shape["N"], shape["H"], shape["V"]
    return [N * H * V, N * V, N * H, V * H, N, V, H, 1]


OPS["linear_logprobs"] = OpSpec(
    "linear_logprobs", ("N", "H", "V"), _linear_inputs, _linear_fastppo, _linear_eager,
    # floor: read hidden and weight in forward and backward, write their gradients
    floor_bytes=lambda s, dt: (2 * 2 + 1) * (s["N"] + s["V"]) * s["H"] * _esize(dt),
    features=_nhv,
    # eager: logits 2NHV + two gradient products 4NHV; fastppo recomputes the logits in backward
    flops=lambda s, side: (8 if side == "fastppo" else 6) * s["N"] * s["H"] * s["V"],
    sweep=tuple({"N": 8192, "H": 4096, "V": v} for v in (32768, 65536, 131072, 151552)),
    # multiples of the kernel tiles (64 x 128 x 64) and of 16 vocabulary chunks of whole tiles
    measure=tuple({"N": n, "H": h, "V": v} for n in (64, 128) for h in (64, 128) for v in (2048, 4096))
    + ({"N": 192, "H": 64, "V": 6144}, {"N": 128, "H": 192, "V": 2048}),
)
