"""`fastppo check`: versions, device, backend per device, then every public op on a small input, in
fp32 and bf16, against an independent float64 computation of its documented formula
(fastppo.reference run in float64 on the same, already rounded, inputs). The ops never run the
reference (fastppo.dispatch maps them to the Triton launchers or their PyTorch twins), so every line
can fail. The first thing to run on a new GPU box."""

from __future__ import annotations

import platform
import time

import torch

from . import reference as ref
from .backend import backend_for, describe
from .modes import POLICY_LOSSES

DTYPES = (torch.float32, torch.bfloat16)
# tolerance of the max error (relative to the reference's magnitude above 1) by output kind and input dtype:
# values and gradients are fp32 (or in the input dtype, for gradients of bf16 inputs)
TOL = {"value": {torch.float32: 1e-5, torch.bfloat16: 1e-5},
       "grad": {torch.float32: 1e-5, torch.bfloat16: 1e-2},
       "logits": {torch.float32: 1e-4, torch.bfloat16: 1e-2}}


def _max_err(a, b):
    """Max abs error, relative to the reference's magnitude when it exceeds 1."""
    a, b = a.double(), b.double()
    if a.shape != b.shape:
        return float("inf")
    if not bool((a.isnan() == b.isnan()).all()):
        return float("inf")
    a, b = a.nan_to_num(0.0), b.nan_to_num(0.0)
    return ((a - b).abs().max() / b.abs().max().clamp_min(1.0)).item() if a.numel() else 0.0


def _grad(fn, x):
    x = x.detach().clone().requires_grad_()
    out = fn(x)
    (out * 1.3).backward()
    return out.detach(), x.grad


def _cases(device, dtype):
    """(name, tolerance, callable returning the max error) for inputs of `dtype`."""
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape, scale=1.0, dt=dtype):
        return (torch.randn(*shape, generator=g) * scale).to(dt).to(device)

    import fastppo

    B, T, V = 2, 5, 1031
    logits = rnd(B, T, V, scale=3.0)
    labels = torch.randint(0, V, (B, T), generator=g).to(device)
    mask = (torch.rand(B, T, generator=g) > 0.2).to(device)
    old = (ref.token_logprobs(logits.double(), labels) + rnd(B, T, scale=0.1, dt=torch.float64)).to(dtype)
    adv = rnd(B, T)
    logp = (old.double() + rnd(B, T, scale=0.2, dt=torch.float64)).to(dtype)
    d = lambda t: t.double()  # noqa: E731
    tl, tv, tg = TOL["logits"][dtype], TOL["value"][dtype], TOL["grad"][dtype]

    def logprobs():
        x = logits.clone().requires_grad_()
        lp, ent = fastppo.token_logprobs(x, labels, return_entropy=True)
        (lp.sum() + ent.sum()).backward()
        xr = d(logits).requires_grad_()
        rlp, rent = ref.token_logprobs(xr, labels, return_entropy=True)
        (rlp.sum() + rent.sum()).backward()
        return max(_max_err(lp, rlp), _max_err(ent, rent), _max_err(x.grad, xr.grad))

    def fused():
        kw = dict(ref_logprobs=old, kl_coef=0.1, entropy_coef=0.01, policy_loss="ppo", dual_clip=3.0)
        loss, grad = _grad(lambda x: fastppo.fused_ppo_loss(x, labels, old, adv, mask, **kw).loss, logits)
        rloss, rgrad = _grad(lambda x: ref.fused_ppo_loss(x, labels, d(old), d(adv), mask,
                                                          **dict(kw, ref_logprobs=d(old))).loss, d(logits))
        return max(_max_err(loss, rloss), _max_err(grad, rgrad))

    def policy(variant):
        def run():
            kw = {"dro_beta": 0.5} if variant == "dro" else {}   # dro's penalty has no default (verl's neither)
            loss, grad = _grad(lambda x: fastppo.ppo_policy_loss(x, old, adv, mask, policy_loss=variant, **kw)[0],
                               logp)
            rloss, rgrad = _grad(lambda x: ref.ppo_policy_loss(x, d(old), d(adv), mask, policy_loss=variant,
                                                               **kw)[0], d(logp))
            return max(_max_err(loss, rloss), _max_err(grad, rgrad))
        return run

    def value():
        loss, grad = _grad(lambda x: fastppo.value_loss(x, old, adv + 1, mask, clip=0.2)[0], adv)
        rloss, rgrad = _grad(lambda x: ref.value_loss(x, d(old), d(adv) + 1, mask, clip=0.2)[0], d(adv))
        return max(_max_err(loss, rloss), _max_err(grad, rgrad))

    def kl():
        kl, grad = _grad(lambda x: fastppo.kl_penalty(x, old + adv, "low_var_kl").sum(), old)
        rkl, rgrad = _grad(lambda x: ref.kl_penalty(x, d(old + adv), "low_var_kl").sum(), d(old))
        return max(_max_err(kl, rkl), _max_err(grad, rgrad))

    def is_weights():
        w, _ = fastppo.rollout_is_weights(old, logp, mask, level="token", mode="truncate", max=1.1)
        return _max_err(w, ref.rollout_is_weights(d(old), d(logp), mask, level="token", mode="truncate", max=1.1))

    def full():
        q = logits.flip(-1)
        kl, grad = _grad(lambda x: fastppo.full_kl(x, q).sum(), logits)
        rkl, rgrad = _grad(lambda x: ref.full_kl(x, d(q)).sum(), d(logits))
        return max(_max_err(kl, rkl), _max_err(grad, rgrad))

    def gae():
        a, r = fastppo.gae(adv, old, mask, gamma=0.99, lam=0.95)
        ra, rr = ref.gae(d(adv).cpu(), d(old).cpu(), mask.cpu(), gamma=0.99, lam=0.95)
        return max(_max_err(a.cpu(), ra), _max_err(r.cpu(), rr))

    def linear():
        h, w = rnd(B * T, 64), rnd(V, 64, scale=0.2)
        y = labels.reshape(-1)
        lp, grad = _grad(lambda x: fastppo.linear_logprobs(x, w, y).sum(), h)
        rlp, rgrad = _grad(lambda x: ref.linear_logprobs(x, d(w), y).sum(), d(h))
        return max(_max_err(lp, rlp), _max_err(grad, rgrad))

    def fused_linear():
        h, w = rnd(B, T, 64), rnd(V, 64, scale=0.2)
        kw = dict(ref_logprobs=old, kl_coef=0.1, entropy_coef=0.01, dual_clip=3.0)
        loss, grad = _grad(lambda x: fastppo.fused_linear_ppo_loss(x, w, labels, old, adv, mask, **kw).loss, h)
        # the reference: float64 logits h @ w.T through the documented fused_ppo_loss formula
        rloss, rgrad = _grad(lambda x: ref.fused_ppo_loss(x @ d(w).T, labels, d(old), d(adv), mask,
                                                          **dict(kw, ref_logprobs=d(old))).loss, d(h))
        return max(_max_err(loss, rloss), _max_err(grad, rgrad))

    def group():
        scores = rnd(4 * 3)
        return _max_err(fastppo.group_advantages(scores, 3), ref.group_advantages(d(scores), 3))

    def whiten():
        return _max_err(fastppo.masked_whiten(adv, mask), ref.masked_whiten(d(adv), mask))

    def shaped():
        scores = rnd(B)
        return _max_err(fastppo.kl_shaped_rewards(scores, old.abs(), mask, kl_coef=0.1),
                        ref.kl_shaped_rewards(d(scores), d(old).abs(), mask, kl_coef=0.1))

    return ([("token_logprobs (+entropy, grad)", tl, logprobs), ("fused_ppo_loss (+grad)", tl, fused),
             ("fused_linear_ppo_loss (+grad)", tl, fused_linear)]
            + [(f"ppo_policy_loss[{v}] (+grad)", tg, policy(v)) for v in POLICY_LOSSES]
            + [("value_loss (+grad)", tg, value), ("kl_penalty (+grad)", tg, kl),
               ("rollout_is_weights", tv, is_weights), ("full_kl (+grad)", tl, full), ("gae", 1e-5, gae),
               ("linear_logprobs (+grad)", tl, linear), ("group_advantages", tv, group),
               ("masked_whiten", tv, whiten), ("kl_shaped_rewards", tv, shaped)])


def run_check(print_fn=print, dtypes=DTYPES, select=None) -> bool:
    """Print the report; True when every line is within tolerance. `select`: run only the lines whose
    op name contains it."""
    import triton

    import fastppo

    print_fn(f"fastppo {fastppo.__version__}  python {platform.python_version()}  torch {torch.__version__}  "
             f"triton {triton.__version__}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine()
    print_fn(f"device: {device} ({name})")
    print_fn("backend per device: " + ", ".join(f"{k} -> {v}" for k, v in describe().items()))
    print_fn(f"ops run on: {backend_for(torch.empty(0, device=device))} (reference: float64, fastppo.reference)")
    ok = True
    for dtype in dtypes:
        tag = str(dtype).replace("torch.", "")
        for label, tol, fn in _cases(device, dtype):
            if select is not None and select not in label:
                continue
            start = time.perf_counter()
            err = fn()
            good = err <= tol
            ok &= good
            print_fn(f"  {'ok ' if good else 'BAD'} {tag:8s} {label:40s} max err {err:.2e} (tol {tol:.0e})  "
                     f"{(time.perf_counter() - start) * 1e3:7.1f} ms")
    print_fn("all ops agree with the reference" if ok else "SOME OPS DISAGREE WITH THE REFERENCE")
    return ok
