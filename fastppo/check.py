"""`fastppo check`: versions, device, backend per device, then every public op on a small input
against its PyTorch reference, with the max error. The first thing to run on a new GPU box."""

from __future__ import annotations

import platform
import time

import torch

from . import reference as ref
from .backend import backend_for, describe


def _max_err(a, b):
    """Max abs error, relative to the reference's magnitude when it exceeds 1."""
    b = b.double()
    return ((a.double() - b).abs().max() / b.abs().max().clamp_min(1.0)).item()


def _cases(device):
    """(name, tolerance, callable returning max error)."""
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device)

    import fastppo

    B, T, V = 2, 5, 1031
    logits = rnd(B, T, V, scale=3.0)
    labels = torch.randint(0, V, (B, T), generator=g).to(device)
    mask = (torch.rand(B, T, generator=g) > 0.2).to(device)
    old = ref.token_logprobs(logits, labels) + rnd(B, T, scale=0.1)
    adv = rnd(B, T)

    def logprobs():
        x = logits.clone().requires_grad_()
        lp, ent = fastppo.token_logprobs(x, labels, return_entropy=True)
        (lp.sum() + ent.sum()).backward()
        xr = logits.double().requires_grad_()
        rlp, rent = ref.token_logprobs(xr, labels, return_entropy=True)
        (rlp.sum() + rent.sum()).backward()
        return max(_max_err(lp, rlp), _max_err(ent, rent), _max_err(x.grad, xr.grad))

    def fused():
        x = logits.clone().requires_grad_()
        out = fastppo.fused_ppo_loss(x, labels, old, adv, mask, ref_logprobs=old, kl_coef=0.1, entropy_coef=0.01)
        out.loss.backward()
        xr = logits.double().requires_grad_()
        rout = ref.fused_ppo_loss(xr, labels, old, adv, mask, ref_logprobs=old, kl_coef=0.1, entropy_coef=0.01)
        rout.loss.backward()
        return max(_max_err(out.loss, rout.loss), _max_err(x.grad, xr.grad))

    def policy():
        return _max_err(fastppo.ppo_policy_loss(old + 0.1, old, adv, mask, dual_clip=3.0)[0],
                        ref.ppo_policy_loss(old + 0.1, old, adv, mask, dual_clip=3.0)[0])

    def value():
        return _max_err(fastppo.value_loss(adv, old, adv + 1, mask, clip=0.2)[0],
                        ref.value_loss(adv, old, adv + 1, mask, clip=0.2)[0])

    def kl():
        return _max_err(fastppo.kl_penalty(old, old + adv, "low_var_kl"), ref.kl_penalty(old, old + adv, "low_var_kl"))

    def full():
        return _max_err(fastppo.full_kl(logits, logits.flip(-1)), ref.full_kl(logits, logits.flip(-1)))

    def gae():
        a, r = fastppo.gae(adv, old, mask, gamma=0.99, lam=0.95)
        ra, rr = ref.gae(adv.cpu(), old.cpu(), mask.cpu(), gamma=0.99, lam=0.95)
        return max(_max_err(a.cpu(), ra), _max_err(r.cpu(), rr))

    def linear():
        h, w = rnd(B * T, 64), rnd(V, 64, scale=0.2)
        return _max_err(fastppo.linear_logprobs(h, w, labels.reshape(-1)),
                        ref.linear_logprobs(h.double(), w.double(), labels.reshape(-1)))

    return [("token_logprobs (+entropy, grad)", 1e-4, logprobs), ("fused_ppo_loss (+grad)", 1e-4, fused),
            ("ppo_policy_loss", 1e-5, policy), ("value_loss", 1e-5, value), ("kl_penalty", 1e-5, kl),
            ("full_kl", 1e-4, full), ("gae", 1e-4, gae), ("linear_logprobs", 1e-4, linear)]


def run_check(print_fn=print) -> bool:
    import triton

    import fastppo

    print_fn(f"fastppo {fastppo.__version__}  python {platform.python_version()}  torch {torch.__version__}  "
             f"triton {triton.__version__}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine()
    print_fn(f"device: {device} ({name})")
    print_fn("backend per device: " + ", ".join(f"{k} -> {v}" for k, v in describe().items()))
    print_fn(f"ops run on: {backend_for(torch.empty(0, device=device))}")
    ok = True
    for label, tol, fn in _cases(device):
        start = time.perf_counter()
        err = fn()
        good = err <= tol
        ok &= good
        print_fn(f"  {'ok ' if good else 'BAD'} {label:34s} max err {err:.2e} (tol {tol:.0e})  "
                 f"{(time.perf_counter() - start) * 1e3:7.1f} ms")
    print_fn("all ops agree with the reference" if ok else "SOME OPS DISAGREE WITH THE REFERENCE")
    return ok
