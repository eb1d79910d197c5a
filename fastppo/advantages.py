"""Advantages and rewards at rollout time: gae (one Triton launch), masked_whiten,
group_advantages (GRPO / RLOO), kl_shaped_rewards and the KL-coefficient controllers.
No autograd: these run under torch.no_grad on rollout data. Each is a torch.library op registered here,
beside its public function; the bodies are in fastppo.advantages_torch (gae: or fastppo.kernels.gae)."""

from __future__ import annotations

import torch

from . import advantages_torch
from ._validation import check_choice, check_float, check_mask, check_number, check_same_shape
from .backend import backend_for
from .dispatch import ops
from .library import acc_dtype, define
from .packed import check_packed


def _check_bt(name, x):
    check_float(name, x)
    if x.dim() != 2:
        raise ValueError(f"{name} must be [B, T], got shape {tuple(x.shape)}")


def _check_discount(name, x):
    return check_number(name, x, low=0.0, high=1.0)


def _check_mask(mask, like_name, like):
    """mask: same shape as `like`, bool or 0/1 values of any dtype (checked where free: see check_mask)."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    check_same_shape("mask", mask, like_name, like.shape)
    check_mask(mask)


# ----------------------------------------------------------------------------- ops
def _gae_fake(rewards, values, mask, gamma, lam, backend, cu_seqlens=None):
    out = rewards.new_empty(rewards.shape, dtype=acc_dtype(rewards, values))
    return out, torch.empty_like(out)


@define("gae", _gae_fake, kernels=True)
def gae_op(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float,
           backend: str, cu_seqlens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns) [B, T] (packed [total] with cu_seqlens); one Triton launch, or the PyTorch loop."""
    return ops("gae", backend).gae_fwd(rewards, values, mask, gamma, lam, cu_seqlens)


def _masked_whiten_fake(x, mask, shift_mean):
    return x.new_empty(x.shape, dtype=acc_dtype(x))


@define("masked_whiten", _masked_whiten_fake, kernels=False)
def masked_whiten_op(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool) -> torch.Tensor:
    return advantages_torch.masked_whiten_torch(x, mask, shift_mean).contiguous()


def _group_advantages_fake(scores, group_size, kind, norm_by_std, eps):
    return scores.new_empty(scores.shape, dtype=acc_dtype(scores))


@define("group_advantages", _group_advantages_fake, kernels=False)
def group_advantages_op(scores: torch.Tensor, group_size: int, kind: str, norm_by_std: bool,
                     eps: float) -> torch.Tensor:
    return advantages_torch.group_advantages_torch(scores, group_size, kind, norm_by_std, eps).contiguous()


def _kl_shaped_rewards_fake(scores, kl, mask, kl_coef, cu_seqlens=None):
    return kl.new_empty(kl.shape, dtype=acc_dtype(scores, kl))


@define("kl_shaped_rewards", _kl_shaped_rewards_fake, kernels=False)
def kl_shaped_rewards_op(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float,
                         cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    return advantages_torch.kl_shaped_rewards_torch(scores, kl, mask, kl_coef, cu_seqlens).contiguous()


# ----------------------------------------------------------------------------- public functions
@torch.no_grad()
def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, gamma: float = 1.0,
        lam: float = 1.0, cu_seqlens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation, mask-aware. rewards, values, mask: [B, T] (any float dtype;
    mask bool/int/float). Masked positions (padding, or tool/observation tokens inside a response)
    are skipped: the recurrence runs over the mask-1 tokens only, so values there never matter.

        for t = T-1..0 over mask-1 tokens: delta = r_t + gamma V_next - V_t,
        A_t = delta + gamma lam A_next;  R_t = A_t + V_t;  0 where mask is 0.

    Returns (advantages, returns), float32 [B, T] (float64 for float64 inputs); rewards/values at masked
    positions (NaN, inf) never reach the result. Any strides. On CUDA / the interpreter it is one Triton launch
    for any T (a reverse associative scan over time chunks); gamma = lam = 1 is a masked reverse
    cumulative sum of (r_t + V_next - V_t). cu_seqlens (int32/int64 [S + 1] offsets): packed sequences,
    rewards / values / mask 1-D [total], results [total] equal to those of the sequences padded."""
    if cu_seqlens is None:
        _check_bt("rewards", rewards)
        _check_bt("values", values)
    else:
        check_float("rewards", rewards)
        check_float("values", values)
        check_packed("rewards", rewards, cu_seqlens)
    check_same_shape("values", values, "rewards", rewards.shape)
    _check_mask(mask, "rewards", rewards)
    _check_discount("gamma", gamma)
    _check_discount("lam", lam)
    return torch.ops.fastppo.gae(rewards, values, mask, float(gamma), float(lam),
                                 backend_for(rewards, values, mask, cu_seqlens), cu_seqlens)


@torch.no_grad()
def masked_whiten(x: torch.Tensor, mask: torch.Tensor, *, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / sqrt(var + 1e-8) over the mask-1 entries, var unbiased (n - 1); with
    shift_mean=False the mean is added back. 0 where mask is 0 (NaN/inf there are ignored). Needs at
    least 2 mask-1 entries: checked where that is free (CPU tensors, outside torch.compile); elsewhere fewer
    give NaN / inf (no host sync). Returns float32 (float64 for float64 x).

    Scale-safe: computed in float64 on x / a, a = max |x| over the mask (two passes: mean, then the
    centred squares), so values near 1e20 (whose squares overflow fp32) or 1e300 whiten correctly:
    out = d / sqrt(q + 1e-8 / a^2), d = x / a - mean(x / a), q = sum(d^2) / (n - 1)."""
    check_float("x", x)
    _check_mask(mask, "x", x)
    if x.device.type == "cpu" and not torch.compiler.is_compiling():
        n = int((mask != 0).sum())
        if n < 2:
            raise ValueError(f"masked_whiten needs at least 2 mask-1 entries, got {n}")
    return torch.ops.fastppo.masked_whiten(x, mask, bool(shift_mean))


@torch.no_grad()
def group_advantages(scores: torch.Tensor, group_size: int, *, kind: str = "grpo", norm_by_std: bool = True,
                     eps: float = 1e-06) -> torch.Tensor:
    """Advantages within groups of `group_size` consecutive sequences (the G samples of one prompt).
    grpo: (R - mean_g) / (std_g + eps) with unbiased std (norm_by_std=False: R - mean_g, Dr. GRPO);
    rloo: R - mean of the other G - 1 scores. A group of one gets 0. scores: [B], B % G == 0.
    Computed in float64 (scores near 1e20 keep their spread); returns float32 [B] (float64 for float64
    scores). `group_size` must be an int (a bool is refused: True is not a group size)."""
    check_float("scores", scores)
    if scores.dim() != 1:
        raise ValueError(f"scores must be [B], got shape {tuple(scores.shape)}")
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise TypeError(f"group_size must be an int, got {type(group_size).__name__} {group_size!r}")
    if group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if scores.numel() % group_size:
        raise ValueError(f"scores has {scores.numel()} entries, not a multiple of group_size={group_size}")
    check_choice("kind", kind, ("grpo", "rloo"))
    eps = check_number("eps", eps, low=0.0, low_open=True)   # eps <= 0 divides by a zero std
    return torch.ops.fastppo.group_advantages(scores, group_size, kind, bool(norm_by_std), eps)


@torch.no_grad()
def kl_shaped_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, *, kl_coef: float,
cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token rewards of RLHF PPO: -kl_coef * kl on every mask-1 token, plus the sequence score
    [B] on its last mask-1 token. Returns float32 [B, T] (0 where mask is 0; a sequence with no
    mask-1 token gets no score). cu_seqlens ([S + 1] offsets): kl / mask packed 1-D [total], scores [S],
    the score on each sequence's last mask-1 token; result [total]."""
    check_float("scores", scores)
    if cu_seqlens is None:
        _check_bt("kl", kl)
        n_seq = kl.shape[0]
    else:
        check_float("kl", kl)
        n_seq = check_packed("kl", kl, cu_seqlens)
    _check_mask(mask, "kl", kl)
    if tuple(scores.shape) != (n_seq,):
        raise ValueError(f"scores must be [{n_seq}], got shape {tuple(scores.shape)}")
    backend_for(scores, kl, mask, cu_seqlens)   # one device
    return torch.ops.fastppo.kl_shaped_rewards(scores, kl, mask, check_number("kl_coef", kl_coef), cu_seqlens)


class FixedKLController:
    """A constant KL coefficient."""

    def __init__(self, kl_coef: float):
        self.value = check_number("kl_coef", kl_coef)

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Proportional controller of Ziegler et al. (2019): with e = clip(kl / target - 1, -0.2, 0.2),
    coef *= 1 + e * n_steps / horizon after each batch of n_steps samples."""

    def __init__(self, init_coef: float, target: float, horizon: float):
        self.value, self.target, self.horizon = (check_number(name, v, low=0.0, low_open=True) for name, v in
                                                 (("init_coef", init_coef), ("target", target), ("horizon", horizon)))

    def update(self, current_kl: float, n_steps: int) -> float:
        err = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + err * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value, self.target, self.horizon = float(state["value"]), float(state["target"]), float(state["horizon"])
