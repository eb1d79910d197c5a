"""The benchmarked ops: for each, inputs at a shape, the call of every side (fastppo, the eager
reference — what trainers run today: the reference module's PyTorch math — and the peer libraries
that offer the same op), the traffic floor and the shapes to measure and to report.

A shape is a dict of the op's dims plus `prompt`: the fraction of every sequence (B = 4 sequences of
T = N / 4 tokens) that is prompt, i.e. masked (`ignore_index` labels for the log-prob ops, mask 0 for
the losses). Side callables return the tensors to back-propagate through (empty for rollout ops).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .. import reference as ref
from . import peers

B_SEQ = 4                     # sequences per batch in every logits / linear op
PROMPTS = (0.0, 0.5, 0.75)    # prompt fractions of the masked sweeps


@dataclass(frozen=True)
class OpSpec:
    name: str
    dims: tuple                       # names of the shape parameters, e.g. ("N", "V")
    make: Callable                    # (shape: dict, dtype, device) -> inputs dict
    sides: dict                       # side name -> (inputs -> tuple of outputs to backward through)
    floor_bytes: Callable             # (shape, dtype) -> bytes the op must move at least
    features: Callable                # shape -> monomials the kernel counts are linear in
    has_backward: bool = True
    sweep: tuple = ()                 # the large shapes of the report (derived on CPU)
    measure: tuple = ()               # small shapes measured in the interpreter (fit + check)
    floor_kind: str = "bytes"         # "bytes" or "flops": what the floor column counts
    floor_flops: Callable = field(default=lambda s: 0)   # shape -> FLOPs floor (linear ops)
    # how the sweep shapes are counted: "dry_run" (fake tensors at the shape; the Triton kernels' bytes
    # and FLOPs fitted) or "fit" (every count fitted: for ops whose eager side is a long Python loop)
    derive: str = "dry_run"
    # the upstream gradient of every output in backward (0.5: the scaling paths run; 1.0: loss.backward())
    upstream: float = 0.5

    @property
    def fastppo(self):
        return self.sides["fastppo"]

    @property
    def eager(self):
        return self.sides["eager"]


def _esize(dtype):
    return torch.empty((), dtype=dtype).element_size()


def n_prompt(shape) -> int:
    """Prompt (masked) positions at the start of each of the B_SEQ sequences."""
    T = shape["N"] // B_SEQ
    return round(shape.get("prompt", 0.0) * T)


def n_valid(shape) -> int:
    return shape["N"] - B_SEQ * n_prompt(shape)


def _prompt_mask(shape, device):
    T = shape["N"] // B_SEQ
    mask = torch.ones(B_SEQ, T, dtype=torch.bool, device=device)
    mask[:, : n_prompt(shape)] = False
    return mask


def _seq_inputs(shape, device, g):
    """old / ref log-probs, per-sequence advantages (broadcast per token) and the prompt mask."""
    T = shape["N"] // B_SEQ
    old = (torch.randn(B_SEQ, T, generator=g) * 0.1 - 7).to(device)
    adv_seq = torch.randn(B_SEQ, generator=g).to(device)
    mask = _prompt_mask(shape, device)
    return {"old": old, "ref": old + 0.05, "adv_seq": adv_seq,
            "adv": adv_seq[:, None].expand(B_SEQ, T).contiguous(), "mask": mask, "mask_int": mask.int()}


def _logits_inputs(shape, dtype, device):
    """logits [B, T, V]; labels [B, T] with ignore_index on the prompt."""
    N, V = shape["N"], shape["V"]
    T = N // B_SEQ
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(B_SEQ, T, V, generator=g) * 2).to(dtype).to(device).requires_grad_()
    labels = torch.randint(0, V, (B_SEQ, T), generator=g).to(device)
    labels[:, : n_prompt(shape)] = -100
    return {"logits": logits, "labels": labels}


def _logprobs_fastppo(inp):
    import fastppo

    return fastppo.token_logprobs(inp["logits"], inp["labels"], return_entropy=True)


def _logprobs_eager(inp):
    return ref.token_logprobs(inp["logits"], inp["labels"], return_entropy=True)


# The loss every side computes: PPO clip (0.2, 0.28), k3 KL to the reference at 0.04, token-mean.
PPO_KW = dict(kl_coef=0.04, kl_kind="k3", clip_low=0.2, clip_high=0.28)


def _ppo_inputs(shape, dtype, device, with_liger=False):
    """logits [B, T, V] with valid labels everywhere, the prompt masked by `mask`; Liger's kernel
    takes logits [B, T + 1, V] (its own tensor of the same values plus one row per sequence)."""
    inp = _logits_inputs({**shape, "prompt": 0.0}, dtype, device)
    g = torch.Generator().manual_seed(1)
    inp.update(_seq_inputs(shape, device, g))
    if with_liger:
        x = inp["logits"].detach()
        inp["liger_logits"] = torch.cat([x, x[:, -1:]], 1).requires_grad_()
    return inp


def _ppo_fastppo(inp):
    import fastppo

    out = fastppo.fused_ppo_loss(inp["logits"], inp["labels"], inp["old"], inp["adv"], inp["mask"],
                                 ref_logprobs=inp["ref"], **PPO_KW)
    return (out.loss,)


def _ppo_fastppo_two_pass(inp):
    """fused_ppo_loss on its two-pass path, as it runs where rows are longer than the one-read path holds
    (V > fastppo.kernels.fused_grad.max_vocab(), every LOGIT_SWEEP shape): the measured shapes then count
    the kernels the sweep shapes launch."""
    from ..fused_grad import one_pass

    with one_pass(False):
        return _ppo_fastppo(inp)


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


def _policy_inputs(shape, dtype, device):
    """Per-token log-probs [B, T] (fp32, as the log-prob ops return them), old log-probs, advantages, a
    mask with 10 % holes: the loss-aggregation kernel alone, at long-context batch sizes."""
    B, T = shape["B"], shape["T"]
    g = torch.Generator().manual_seed(5)
    old = (torch.randn(B, T, generator=g) * 0.1 - 7).to(device)
    return {"logp": (old + 0.01 * torch.randn(B, T, generator=g)).to(device).requires_grad_(), "old": old,
            "adv": torch.randn(B, T, generator=g).to(device), "mask": (torch.rand(B, T, generator=g) > 0.1).to(device)}


def _policy_fastppo(inp):
    import fastppo

    return (fastppo.ppo_policy_loss(inp["logp"], inp["old"], inp["adv"], inp["mask"], clip_low=0.2,
                                    clip_high=0.28)[0],)


def _policy_eager(inp):
    return (ref.ppo_policy_loss(inp["logp"], inp["old"], inp["adv"], inp["mask"], clip_low=0.2, clip_high=0.28)[0],)


def _nv(shape):
    return [shape["N"] * shape["V"], shape["N"], shape["V"], 1]


def logits_floor(shape, dtype, reads=2):
    """Read the valid rows `reads` times (forward, backward) and write their gradient once; a masked
    row only gets its zero gradient written."""
    row = shape["V"] * _esize(dtype)
    return (reads + 1) * n_valid(shape) * row + (shape["N"] - n_valid(shape)) * row


def _masked(shapes):
    return tuple({**s, "prompt": p} for p in PROMPTS for s in shapes)


LOGIT_SWEEP = tuple({"N": n, "V": v} for n in (4096, 16384) for v in (32000, 65536, 128256, 151936))
ONE_READ_SWEEP = tuple({"N": n, "V": v} for n in (4096, 16384) for v in (8192, 16384))
# B = 4 sequences of T = N / 4 tokens, T a multiple of 4 so that 50 % and 75 % prompts are whole
LOGIT_MEASURE = ({"N": 16, "V": 1024}, {"N": 32, "V": 1024}, {"N": 16, "V": 2048}, {"N": 32, "V": 1536},
                 {"N": 48, "V": 1024})

OPS = {
    "token_logprobs": OpSpec(
        "token_logprobs", ("N", "V"), _logits_inputs,
        {"fastppo": _logprobs_fastppo, "eager": _logprobs_eager, "trl": peers.trl_token_logprobs},
        floor_bytes=logits_floor, features=_nv, sweep=_masked(LOGIT_SWEEP), measure=_masked(LOGIT_MEASURE)),
    "fused_ppo_loss": OpSpec(
        "fused_ppo_loss", ("N", "V"), lambda s, dt, dev: _ppo_inputs(s, dt, dev, with_liger=True),
        {"fastppo": _ppo_fastppo_two_pass, "eager": _ppo_eager,
         "liger": lambda inp: peers.liger_ppo_loss(inp, PPO_KW)},
        floor_bytes=logits_floor, features=_nv, sweep=_masked(LOGIT_SWEEP), measure=_masked(LOGIT_MEASURE)),
    # rows that fit the one-read path (kernels/fused_grad.py), the gradient formed in forward, with the upstream
    # gradient of loss.backward() (1; any other costs one more read + write of the live rows)
    "fused_ppo_loss_one_read": OpSpec(
        "fused_ppo_loss_one_read", ("N", "V"), lambda s, dt, dev: _ppo_inputs(s, dt, dev, with_liger=True),
        {"fastppo": _ppo_fastppo, "eager": _ppo_eager, "liger": lambda inp: peers.liger_ppo_loss(inp, PPO_KW)},
        floor_bytes=logits_floor, features=_nv, sweep=_masked(ONE_READ_SWEEP), measure=_masked(LOGIT_MEASURE),
        upstream=1.0),
    "full_kl": OpSpec(
        "full_kl", ("N", "V"), _kl_inputs,
        {"fastppo": lambda inp: (__import__("fastppo").full_kl(inp["logits"], inp["ref_logits"]),),
         "eager": lambda inp: (ref.full_kl(inp["logits"], inp["ref_logits"]),)},
        floor_bytes=lambda s, dt: 5 * s["N"] * s["V"] * _esize(dt), features=_nv,
        sweep=tuple({**s, "prompt": 0.0} for s in LOGIT_SWEEP),
        measure=tuple({**s, "prompt": 0.0} for s in LOGIT_MEASURE)),
    "gae": OpSpec(
        "gae", ("B", "T"), _gae_inputs, {"fastppo": _gae_fastppo, "eager": _gae_eager},
        floor_bytes=lambda s, dt: s["B"] * s["T"] * (4 + 4 + 1 + 4 + 4),
        features=lambda s: [s["B"] * s["T"], s["T"], s["B"], 1], has_backward=False, derive="fit",
        sweep=tuple({"B": b, "T": t} for b in (64, 512) for t in (1024, 8192, 32768)),
        measure=({"B": 2, "T": 64}, {"B": 3, "T": 64}, {"B": 2, "T": 96}, {"B": 3, "T": 128},
                 {"B": 4, "T": 96})),
    # the aggregation kernel by itself: read logp, old, adv, mask, write the per-token gradient coefficient
    "ppo_policy_loss": OpSpec(
        "ppo_policy_loss", ("B", "T"), _policy_inputs, {"fastppo": _policy_fastppo, "eager": _policy_eager},
        floor_bytes=lambda s, dt: s["B"] * s["T"] * (4 + 4 + 4 + 1 + 4),
        features=lambda s: [s["B"] * s["T"], s["T"], s["B"], 1],
        sweep=tuple({"B": b, "T": t} for b in (64, 256) for t in (1024, 4096)),
        measure=({"B": 2, "T": 64}, {"B": 3, "T": 64}, {"B": 2, "T": 96}, {"B": 3, "T": 128},
                 {"B": 4, "T": 96})),
}


def _linear_inputs(shape, dtype, device):
    """hidden [N, H], weight [V, H], labels [N] (ignore_index on the prompt) and the valid row indices."""
    N, H, V = shape["N"], shape["H"], shape["V"]
    g = torch.Generator().manual_seed(3)
    labels = torch.randint(0, V, (B_SEQ, N // B_SEQ), generator=g)
    labels[:, : n_prompt(shape)] = -100
    labels = labels.reshape(N).to(device)
    return {"hidden": torch.randn(N, H, generator=g).to(dtype).to(device).requires_grad_(),
            "weight": (torch.randn(V, H, generator=g) / H**0.5).to(dtype).to(device).requires_grad_(),
            # the rows TRL's fused forward gathers (labels != -100), known without a data-dependent op
            "valid_rows": torch.arange(N, device=device).view(B_SEQ, -1)[:, n_prompt(shape):].reshape(-1),
            "labels": labels}


def _linear_fastppo(inp):
    import fastppo

    return fastppo.linear_logprobs(inp["hidden"], inp["weight"], inp["labels"], return_entropy=True)


def _linear_eager(inp):
    return ref.linear_logprobs(inp["hidden"], inp["weight"], inp["labels"], return_entropy=True)


def _linear_ppo_inputs(shape, dtype, device):
    """hidden [B, T, H], weight [V, H], valid labels everywhere, the prompt masked by `mask`."""
    N, H = shape["N"], shape["H"]
    inp = _linear_inputs({**shape, "prompt": 0.0}, dtype, device)
    inp["hidden"] = inp["hidden"].detach().view(B_SEQ, N // B_SEQ, H).requires_grad_()
    inp["labels"] = inp["labels"].view(B_SEQ, N // B_SEQ)
    inp.update(_seq_inputs(shape, device, torch.Generator().manual_seed(4)))
    # the completion rows TRL's GRPOTrainer scores with its fused head (mask != 0), known without a data-dependent op
    inp["loss_rows"] = torch.arange(N, device=device).view(B_SEQ, -1)[:, n_prompt(shape):].reshape(-1)
    return inp


def _linear_ppo_fastppo(inp):
    import fastppo

    out = fastppo.fused_linear_ppo_loss(inp["hidden"], inp["weight"], inp["labels"], inp["old"], inp["adv"],
                                        inp["mask"], ref_logprobs=inp["ref"], **PPO_KW)
    return (out.loss,)


def _linear_ppo_eager(inp):
    out = ref.fused_ppo_loss(inp["hidden"] @ inp["weight"].t(), inp["labels"], inp["old"], inp["adv"], inp["mask"],
                             ref_logprobs=inp["ref"], **PPO_KW)
    return (out.loss,)


def _nhv(shape):
    N, H, V = shape["N"], shape["H"], shape["V"]
    return [N * H * V, N * V, N * H, V * H, N, V, H, 1]


def linear_floor(shape, dtype):
    """Read hidden and weight in forward and backward, write their gradients."""
    return (2 * 2 + 1) * (shape["N"] + shape["V"]) * shape["H"] * _esize(dtype)


def linear_flops_floor(shape):
    """2 N_valid H V forward + 4 N_valid H V for the two gradient products (gradient formed in forward)."""
    return 6 * n_valid(shape) * shape["H"] * shape["V"]


LINEAR_SWEEP = tuple({"N": 8192, "H": 4096, "V": v} for v in (32768, 65536, 131072, 151552))
# every prompt fraction of PROMPTS: fastppo's linear kernels are counted by their per-launch model at the large
# shapes (bench/linear_cost.py), the other kernels' counts (TRL's folds, the loss kernels) are linear in the rows
LINEAR_PROMPTS = PROMPTS
LINEAR_MEASURE = (tuple({"N": n, "H": h, "V": v} for n in (128, 256) for h in (128, 256) for v in (2048, 4096))
                  + ({"N": 384, "H": 128, "V": 6144}, {"N": 256, "H": 384, "V": 2048}))


def _linear_masked(shapes, prompts=LINEAR_PROMPTS):
    return tuple({**s, "prompt": p} for p in prompts for s in shapes)


OPS["linear_logprobs"] = OpSpec(
    "linear_logprobs", ("N", "H", "V"), _linear_inputs,
    {"fastppo": _linear_fastppo, "eager": _linear_eager, "trl": peers.trl_linear_logprobs},
    floor_bytes=linear_floor, features=_nhv, floor_kind="flops", floor_flops=linear_flops_floor,
    sweep=_linear_masked(LINEAR_SWEEP), measure=_linear_masked(LINEAR_MEASURE))
OPS["fused_linear_ppo_loss"] = OpSpec(
    "fused_linear_ppo_loss", ("N", "H", "V"), _linear_ppo_inputs,
    {"fastppo": _linear_ppo_fastppo, "eager": _linear_ppo_eager,
     "liger": lambda inp: peers.liger_linear_ppo_loss(inp, PPO_KW),
     "trl": lambda inp: peers.trl_linear_ppo_loss(inp, PPO_KW)},
    floor_bytes=linear_floor, features=_nhv, floor_kind="flops", floor_flops=linear_flops_floor,
    sweep=_linear_masked(LINEAR_SWEEP), measure=_linear_masked(LINEAR_MEASURE))

# --- on-policy distillation from both models' hidden states: the scalar loss (mean over the valid tokens) ----------
DISTILL_BETA = 0.5   # the generalised JSD (TRL's DistillationTrainer default; Liger's JSD)


def _distill_inputs(shape, dtype, device):
    """Student and teacher hidden [N, H] and heads [V, H] (same H), labels [N] (ignore_index on the prompt: Liger's
    mask), the prompt masked by `mask`, and the valid row indices (TRL's trainer passes only those rows)."""
    N, H, V = shape["N"], shape["H"], shape["V"]
    inp = _linear_inputs(shape, dtype, device)
    g = torch.Generator().manual_seed(5)
    inp["teacher_hidden"] = torch.randn(N, H, generator=g).to(dtype).to(device)
    inp["teacher_weight"] = (torch.randn(V, H, generator=g) / H**0.5).to(dtype).to(device)
    inp["mask"] = inp["labels"] != -100
    return inp


def _distill_fastppo(inp):
    """linear_divergence_loss on the valid rows, gathered as TRL's trainer gathers them (on a GPU fastppo projects
    every row it is given, masked ones zeroed: gathering first is what makes the prompt free there)."""
    import fastppo

    idx = inp["valid_rows"]
    loss, _ = fastppo.linear_divergence_loss(inp["hidden"].index_select(0, idx), inp["weight"],
                                             inp["teacher_hidden"].index_select(0, idx), inp["teacher_weight"],
                                             beta=DISTILL_BETA)
    return (loss,)


def _distill_eager(inp):
    """The PyTorch every trainer ran before the fused heads: both models' fp32 logits, log-softmax, the divergence."""
    from ..reference_divergence import divergence_from_logprobs

    lp_s = torch.log_softmax((inp["hidden"] @ inp["weight"].t()).float(), -1)
    lp_t = torch.log_softmax((inp["teacher_hidden"] @ inp["teacher_weight"].t()).float(), -1)
    div = divergence_from_logprobs(lp_s, lp_t, DISTILL_BETA)
    m = inp["mask"].to(div.dtype)
    return ((div * m).sum() / m.sum(),)


OPS["linear_divergence"] = OpSpec(
    "linear_divergence", ("N", "H", "V"), _distill_inputs,
    {"fastppo": _distill_fastppo, "eager": _distill_eager,
     "trl": lambda inp: peers.trl_linear_divergence(inp, DISTILL_BETA),
     "liger": lambda inp: peers.liger_linear_jsd(inp, DISTILL_BETA)},
    floor_bytes=linear_floor, features=_nhv, floor_kind="flops", floor_flops=lambda s: 8 * n_valid(s) * s["H"] * s["V"],
    # its kernels' counts are fitted (whole 64-row tiles of valid rows at every measured shape: 0 and 50 % prompt)
    sweep=_linear_masked(LINEAR_SWEEP, (0.0, 0.5)), measure=_linear_masked(LINEAR_MEASURE, (0.0, 0.5)))

PEER_OF_SIDE = {"trl": "trl", "liger": "liger"}


def side_missing(side: str) -> str | None:
    """Why `side` cannot run here (a peer library not installed), or None."""
    return peers.missing(PEER_OF_SIDE[side]) if side in PEER_OF_SIDE else None
