"""Largest difference between OpenRLHF 0.11's own functions and the same calls under
`fastppo.integrations.patch("openrlhf")`, for every loss, IS-correction mode and helper the adapter serves
(issue #25's closing-note table): random fp32 inputs with a mask with holes and an empty row, upstream gradients
not all ones; for each case the relative difference max|patched - host| / max|host| of the loss and of the
gradient (the larger of the two is printed), and who served the patched call. Not a test: it measures
(tests/integrations/test_openrlhf.py asserts 1e-5). Runs whichever backend this machine picks (PyTorch on a
CPU without TRITON_INTERPRET=1; the Triton interpreter with it).

    PYTHONPATH=. python bench/openrlhf_diffs.py
"""

from __future__ import annotations

import torch
from cpu_hosts import openrlhf_utils  # bench/ is this script's folder: OpenRLHF without flash-attn's CUDA extension

ou = openrlhf_utils()
import openrlhf.models.loss as ol  # noqa: E402

import fastppo.integrations as fi  # noqa: E402


def _rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _inputs(B=16, T=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(B, T, generator=g) * 3
    old = lp + torch.randn(B, T, generator=g) * 0.2
    roll = old + torch.randn(B, T, generator=g) * 0.2
    adv = torch.randn(B, T, generator=g)
    m = (torch.rand(B, T, generator=g) > 0.25).float()
    m[3] = 0.0
    return lp, old, roll, adv, m


def _policy(kwargs, counts, no_mask=False):
    lp, old, roll, adv, m = _inputs()
    m = None if no_mask else m
    up = 1.7
    outs = []
    for patched in (False, True):
        x = lp.clone().requires_grad_()
        with fi.patch("openrlhf", ops=["PolicyLoss"]) if patched else _Null() as h:
            loss, *_, filt = ol.PolicyLoss(**kwargs)(x, old, adv, m, rollout_log_probs=roll, **counts)
            who = None if h is None else ("served" if h.stats.served else "delegated")
        (loss * up).backward()
        outs.append((loss, x.grad, who, filt))
    (l0, g0, _, filt), (l1, g1, who, _) = outs
    return max(_rel(l1, l0), _rel(g1, g0)), who if filt is None else f"{who} (host filtered {float(filt):.2f})"


def _value(kwargs, counts):
    _, _, _, _, m = _inputs()
    g = torch.Generator().manual_seed(1)
    v, ov, ret = (torch.randn(m.shape, generator=g) for _ in range(3))
    outs = []
    for patched in (False, True):
        x = v.clone().requires_grad_()
        with fi.patch("openrlhf", ops=["ValueLoss"]) if patched else _Null() as h:
            loss = ol.ValueLoss(**kwargs)(x, ov, ret, m, **counts)
            who = None if h is None else ("served" if h.stats.served else "delegated")
        (loss * 1.3).backward()
        outs.append((loss, x.grad, who))
    (l0, g0, _), (l1, g1, who) = outs
    return max(_rel(l1, l0), _rel(g1, g0)), who


def _kl(kind, unbiased):
    lp, old, _, _, _ = _inputs()
    base = lp + torch.randn(lp.shape, generator=torch.Generator().manual_seed(2)) * 0.5
    up = torch.linspace(-1, 2, lp.numel()).view_as(lp)
    outs = []
    for patched in (False, True):
        x, y = lp.clone().requires_grad_(), base.clone().requires_grad_()
        with fi.patch("openrlhf", ops=["compute_approx_kl"]) if patched else _Null() as h:
            kl = ou.compute_approx_kl(x, y, log_probs_old=old, kl_estimator=kind, unbiased_gradient=unbiased)
            who = None if h is None else ("served" if h.stats.served else "delegated")
        (kl * up).sum().backward()
        outs.append((kl, x.grad, y.grad, who))
    a, b = outs
    return max(_rel(b[i], a[i]) for i in range(3)), b[3]


def _logits_fn(name):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 32, 1031, generator=g) * 3
    labels = torch.randint(0, 1031, (4, 32), generator=g)
    up = torch.randn(4, 32, generator=g)
    outs = []
    for patched in (False, True):
        z = logits.clone().requires_grad_()
        with fi.patch("openrlhf", ops=[name]) if patched else _Null() as h:
            y = ou.log_probs_from_logits(z * 1.0, labels) if name == "log_probs_from_logits" else ou.compute_entropy(z)
            who = None if h is None else ("served" if h.stats.served else "delegated")
        (y * up).sum().backward()
        outs.append((y, z.grad, who))
    (y0, g0, _), (y1, g1, who) = outs
    return max(_rel(y1, y0), _rel(g1, g0)), who


class _Null:
    def __enter__(self):
        return None

    def __exit__(self, *e):
        return False


COUNTS = {"dp_size": 2, "batch_num_tokens": 700.0, "global_batch_size": 20.0}
POLICY = {
    "ppo token": {},
    "ppo dual clip": {"dual_clip": 3.0},
    "ppo IS token clip (TIS)": {"is_correction_level": "token", "is_correction_mode": "clip",
                                "is_correction_threshold": (0.8, 1.25)},
    "ppo IS token mask (ICEPOP)": {"is_correction_level": "token", "is_correction_threshold": (0.8, 1.25)},
    "ppo IS seq mask (seq-mask-tis)": {"is_correction_level": "seq", "is_correction_threshold": (0.95, 1.05)},
    "ppo IS token binary_kl": {"is_correction_level": "token", "is_correction_gating": "binary_kl",
                               "is_correction_threshold": (0.0, 0.005)},
    "ppo IS token tv": {"is_correction_level": "token", "is_correction_gating": "tv",
                        "is_correction_threshold": (0.0, 0.05)},
    "ppo IS seq binary_kl": {"is_correction_level": "seq", "is_correction_gating": "binary_kl",
                             "is_correction_threshold": (0.0, 0.02)},
    "ppo IS seq tv": {"is_correction_level": "seq", "is_correction_gating": "tv",
                      "is_correction_threshold": (0.0, 0.04)},
    "gspo": {"policy_loss_type": "gspo"},
    "gspo IS (ratio vs rollout)": {"policy_loss_type": "gspo", "is_correction_level": "token"},
    "gspo dual clip": {"policy_loss_type": "gspo", "dual_clip": 3.0},
    "gspo dual clip IS": {"policy_loss_type": "gspo", "dual_clip": 3.0, "is_correction_level": "token"},
}


def main():
    rows = []
    for name, kw in POLICY.items():
        for tag, counts in (("", {}), (" +counts", COUNTS)):
            for tl in ((False,) if "gspo" in name else (True, False)):   # GSPO forces the per-sample loss
                kwargs = {"clip_eps_low": 0.2, "clip_eps_high": 0.28, "token_level_loss": tl, **kw}
                label = f"PolicyLoss {name}{'' if tl else ' (seq loss)'}{tag}"
                rows.append((label, *_policy(kwargs, counts)))
    rows.append(("PolicyLoss ppo, action_mask=None", *_policy({}, {}, no_mask=True)))
    rows.append(("PolicyLoss ppo IS token mask, action_mask=None",
                 *_policy({"is_correction_level": "token", "is_correction_threshold": (0.8, 1.25)}, {}, no_mask=True)))
    for clip in (None, 0.2):
        for tl in (True, False):
            rows.append((f"ValueLoss clip={clip} {'token' if tl else 'seq'}",
                         *_value({"clip_eps": clip, "token_level_loss": tl}, COUNTS)))
    for kind in ("k1", "k2", "k3"):
        for unbiased in (False, True):
            rows.append((f"compute_approx_kl {kind}{' unbiased_gradient' if unbiased else ''}", *_kl(kind, unbiased)))
    rows.append(("log_probs_from_logits", *_logits_fn("log_probs_from_logits")))
    rows.append(("compute_entropy", *_logits_fn("compute_entropy")))
    width = max(len(r[0]) for r in rows)
    print(f"{'OpenRLHF call':{width}s}  {'max rel diff':>12s}  patched call (IS: the fraction gated out)")
    for label, diff, who in rows:
        print(f"{label:{width}s}  {diff:12.2e}  {who}")


if __name__ == "__main__":
    main()
