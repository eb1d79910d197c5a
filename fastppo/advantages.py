"""Advantages and rewards at rollout time: gae (one Triton launch), masked_whiten,
group_advantages (GRPO / RLOO), kl_shaped_rewards and the KL-coefficient controllers.
No autograd: these run under torch.no_grad on rollout data."""

from __future__ import annotations

import math

import torch

from . import library  # noqa: F401  (registers torch.ops.fastppo)
from ._checks import check_choice, check_float, check_same_shape
from .backend import backend_for


def _check_bt(name, x):
    check_float(name, x)
    if x.dim() != 2:
        raise ValueError(f"{name} must be [B, T], got shape {tuple(x.shape)}")


def _check_discount(name, x):
    if not 0.0 <= float(x) <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {x}")


@torch.no_grad()
def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, gamma: float = 1.0,
        lam: float = 1.0):
    """Generalised advantage estimation, mask-aware. rewards, values, mask: [B, T] (any float dtype;
    mask bool/int/float). Masked positions (padding, or tool/observation tokens inside a response)
    are skipped: the recurrence runs over the mask-1 tokens only, so values there never matter.

        for t = T-1..0 over mask-1 tokens: delta = r_t + gamma V_next - V_t,
        A_t = delta + gamma lam A_next;  R_t = A_t + V_t;  0 where mask is 0.

    Returns (advantages, returns), float32 [B, T]. On CUDA / the interpreter it is one Triton launch
    for any T (a reverse associative scan over time chunks); gamma = lam = 1 is a masked reverse
    cumulative sum of (r_t + V_next - V_t)."""
    _check_bt("rewards", rewards)
    _check_bt("values", values)
    check_same_shape("values", values, "rewards", rewards.shape)
    check_same_shape("mask", mask, "rewards", rewards.shape)
    _check_discount("gamma", gamma)
    _check_discount("lam", lam)
    return torch.ops.fastppo.gae(rewards, values, mask, float(gamma), float(lam), backend_for(rewards, values, mask))


def gae_torch(rewards, values, mask, gamma, lam):
    """The PyTorch backend of gae: the reverse loop over time, in fp32."""
    r, v, m = rewards.float(), values.float(), mask.bool()
    B, T = r.shape
    adv = torch.zeros(B, T, dtype=torch.float32, device=r.device)
    g = torch.zeros(B, dtype=torch.float32, device=r.device)
    v_next = torch.zeros_like(g)
    for t in reversed(range(T)):
        mt = m[:, t]
        g_t = r[:, t] + gamma * v_next - v[:, t] + gamma * lam * g
        g = torch.where(mt, g_t, g)
        v_next = torch.where(mt, v[:, t], v_next)
        adv[:, t] = torch.where(mt, g_t, torch.zeros_like(g_t))
    return adv, torch.where(m, adv + v, torch.zeros_like(adv))


@torch.no_grad()
def masked_whiten(x: torch.Tensor, mask: torch.Tensor, *, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / sqrt(var + 1e-8) over the mask-1 entries, var unbiased (n - 1); with
    shift_mean=False the mean is added back. 0 where mask is 0. Needs at least 2 mask-1 entries: checked
    where that is free (CPU tensors, outside torch.compile); elsewhere fewer give NaN / inf (no host sync)."""
    check_float("x", x)
    check_same_shape("mask", mask, "x", x.shape)
    if x.device.type == "cpu" and not torch.compiler.is_compiling():
        n = int((mask != 0).sum())
        if n < 2:
            raise ValueError(f"masked_whiten needs at least 2 mask-1 entries, got {n}")
    return torch.ops.fastppo.masked_whiten(x, mask, bool(shift_mean))


def masked_whiten_torch(x, mask, shift_mean):
    m = mask != 0
    zero = torch.zeros((), dtype=torch.float32, device=x.device)
    n = m.sum().float()
    xf = torch.where(m, x.float(), zero)   # masked positions may hold inf / NaN
    mean = xf.sum() / n
    var = torch.where(m, xf - mean, zero).square().sum() / (n - 1)
    out = (xf - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return torch.where(m, out, zero)


@torch.no_grad()
def group_advantages(scores: torch.Tensor, group_size: int, *, kind: str = "grpo", norm_by_std: bool = True,
                     eps: float = 1e-6) -> torch.Tensor:
    """Advantages within groups of `group_size` consecutive sequences (the G samples of one prompt).
    grpo: (R - mean_g) / (std_g + eps) with unbiased std (norm_by_std=False: R - mean_g, Dr. GRPO);
    rloo: R - mean of the other G - 1 scores. A group of one gets 0. scores: [B], B % G == 0.
    Returns float32 [B]."""
    check_float("scores", scores)
    if scores.dim() != 1:
        raise ValueError(f"scores must be [B], got shape {tuple(scores.shape)}")
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if scores.numel() % group_size:
        raise ValueError(f"scores has {scores.numel()} entries, not a multiple of group_size={group_size}")
    check_choice("kind", kind, ("grpo", "rloo"))
    return torch.ops.fastppo.group_advantages(scores, group_size, kind, bool(norm_by_std), float(eps))


def group_advantages_torch(scores, group_size, kind, norm_by_std, eps):
    if group_size == 1:
        return torch.zeros_like(scores, dtype=torch.float32)
    s = scores.float().view(-1, group_size)
    mean = s.mean(-1, keepdim=True)
    if kind == "rloo":
        out = s - (s.sum(-1, keepdim=True) - s) / (group_size - 1)
    else:
        out = s - mean
        if norm_by_std:
            out = out / (s.std(-1, keepdim=True) + eps)
    return out.reshape(-1)


@torch.no_grad()
def kl_shaped_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, *, kl_coef: float):
    """Per-token rewards of RLHF PPO: -kl_coef * kl on every mask-1 token, plus the sequence score
    [B] on its last mask-1 token. Returns float32 [B, T] (0 where mask is 0; a sequence with no
    mask-1 token gets no score)."""
    check_float("scores", scores)
    _check_bt("kl", kl)
    check_same_shape("mask", mask, "kl", kl.shape)
    if tuple(scores.shape) != (kl.shape[0],):
        raise ValueError(f"scores must be [{kl.shape[0]}], got shape {tuple(scores.shape)}")
    return torch.ops.fastppo.kl_shaped_rewards(scores, kl, mask, float(kl_coef))


def kl_shaped_rewards_torch(scores, kl, mask, kl_coef):
    """No value-dependent shapes: the score lands where the position equals the last mask-1 position."""
    m = mask != 0
    zero = torch.zeros((), dtype=torch.float32, device=kl.device)
    out = torch.where(m, -kl_coef * kl.float(), zero)
    positions = torch.arange(m.shape[1], device=m.device).expand_as(m)
    last = torch.where(m, positions, torch.full_like(positions, -1)).amax(-1, keepdim=True)
    return out + torch.where(positions == last, scores.float()[:, None], zero)


class FixedKLController:
    """A constant KL coefficient."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value

    def state_dict(self):
        return {"value": self.value}

    def load_state_dict(self, state):
        self.value = float(state["value"])


class AdaptiveKLController:
    """Proportional controller of Ziegler et al. (2019): with e = clip(kl / target - 1, -0.2, 0.2),
    coef *= 1 + e * n_steps / horizon after each batch of n_steps samples."""

    def __init__(self, init_coef: float, target: float, horizon: float):
        for name, v in (("init_coef", init_coef), ("target", target), ("horizon", horizon)):
            if not (float(v) > 0 and math.isfinite(float(v))):
                raise ValueError(f"{name} must be a positive finite number, got {v}")
        self.value, self.target, self.horizon = float(init_coef), float(target), float(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        err = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + err * n_steps / self.horizon
        return self.value

    def state_dict(self):
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state):
        self.value, self.target, self.horizon = float(state["value"]), float(state["target"]), float(state["horizon"])
