"""fused_ppo_loss with the gradient formed in the forward pass (kernels/fused_grad.py, fastppo/fused_grad.py):
numerics against the float64 reference and against the two-pass path, the path choice, inplace and repeated
backward, and the byte / launch counters at 0 / 50 / 75 % prompt."""

import pytest
import torch

import fastppo
from fastppo import reference as ref
from fastppo.bench.counters import TritonLaunches
from fastppo.kernels import _config as cfg
from fastppo.kernels.launches import count_launches
from tests.helpers import DEVICE, assert_close_by_dtype, make_labels, make_logits, make_mask

B, T, V = 3, 5, 301


def _inputs(dtype, B=B, T=T, V=V, per_seq_adv=False, holes=0.1):
    logits = make_logits((B, T, V), dtype, scale=2.0)
    labels = make_labels((B, T), V, holes=holes)
    mask = make_mask((B, T)) & (labels != -100)
    with torch.no_grad():
        lp = ref.token_logprobs(logits.double(), labels).to(torch.float32)
    old = lp + 0.3 * torch.randn(B, T, device=DEVICE)
    refp = lp + 0.2 * torch.randn(B, T, device=DEVICE)
    adv = torch.randn(B, device=DEVICE) if per_seq_adv else torch.randn(B, T, device=DEVICE)
    if dtype == torch.float64:          # a float64 check end to end (per-token inputs too)
        old, adv, refp = old.double(), adv.double(), refp.double()
    return logits, labels, old, adv, mask, refp


def _run(fn, logits, *args, upstream=1.7, **kw):
    x = logits.detach().clone().requires_grad_()
    with count_launches() as launches:
        out = fn(x, *args, **kw)
        (out.loss * upstream).backward()
    return out, x.grad, launches


def _compare(out, rout, grad, rgrad, dtype, tol=1e-4):
    torch.testing.assert_close(out.loss.double(), rout.loss, rtol=tol, atol=tol)
    assert_close_by_dtype(grad, rgrad, dtype)
    torch.testing.assert_close(out.logprobs.double(), rout.logprobs, rtol=tol, atol=tol)
    for k in out.stats:   # (the reference counts clipfrac in fp32)
        torch.testing.assert_close(out.stats[k].double(), rout.stats[k].double(), rtol=max(tol, 1e-7), atol=tol,
                                   msg=k)


POLICIES = [("ppo", dict(dual_clip=2.0, ratio_max=3.0, clip_high=0.28)), ("cispo", {}),
            ("sapo", dict(sapo_tau_pos=1.25, sapo_tau_neg=1.125)), ("gpg", {})]
AGGS = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm", "token-sum"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("policy", range(len(POLICIES)))
def test_one_pass_matches_float64(policy, dtype):
    name, extra = POLICIES[policy]
    logits, labels, old, adv, mask, refp = _inputs(dtype, per_seq_adv=policy == 1)
    isw = (torch.rand(B, T, device=DEVICE) + 0.5).to(old.dtype)
    # coefficients exact in fp32: the kernels take their scalar options as fp32 (the aggregation kernels too)
    kw = dict(ref_logprobs=refp, kl_coef=0.125, kl_kind=["k3", "low_var_kl", "k1", "k2"][policy], entropy_coef=0.03125,
              policy_loss=name, agg=AGGS[policy], rollout_is_weights=isw, temperature=0.9, **extra)
    out, grad, launches = _run(fastppo.fused_ppo_loss, logits, labels, old, adv, mask, **kw)
    assert launches["fused_grad_fwd"] == 1 and "logprobs_fwd" not in launches
    assert grad.dtype == dtype
    rout, rgrad, _ = _run(ref.fused_ppo_loss, logits.double(), labels, old, adv, mask, **kw)
    _compare(out, rout, grad, rgrad, dtype, tol=1e-10 if dtype == torch.float64 else 2e-4)
    torch.testing.assert_close(out.kl.double(), rout.kl, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.entropy.double(), rout.entropy, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("upstream", [1.0, 1.7])
def test_one_pass_equals_two_pass(monkeypatch, upstream):
    logits, labels, old, adv, mask, refp = _inputs(torch.float32)
    kw = dict(ref_logprobs=refp, kl_coef=0.05, entropy_coef=0.01, clip_high=0.3)
    out, grad, launches = _run(fastppo.fused_ppo_loss, logits, labels, old, adv, mask, upstream=upstream, **kw)
    assert launches["fused_grad_fwd"] == 1
    monkeypatch.setattr(cfg, "FUSED_GRAD_MAX_V", 0)        # every row "too long": the two-pass path
    tout, tgrad, launches = _run(fastppo.fused_ppo_loss, logits, labels, old, adv, mask, upstream=upstream, **kw)
    assert launches["logprobs_fwd"] == launches["logprobs_bwd"] == 1 and "fused_grad_fwd" not in launches
    torch.testing.assert_close(out.loss, tout.loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad, tgrad, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(out.entropy, tout.entropy, rtol=1e-6, atol=1e-6)


def test_views_masks_and_transforms():
    """A shifted view of bigger logits, rows of a non-contiguous batch, holes, an empty row, a per-token
    temperature, logit_scale and a softcap, NaN in dead rows: against float64."""
    logits, labels, old, adv, mask, refp = _inputs(torch.bfloat16, holes=0.2)
    dead = (mask == 0) | (labels == -100)
    big = torch.cat([logits, logits[:, :2]], dim=1)
    big[:, :T][dead] = float("nan")                         # never read
    big.requires_grad_()
    view = big[:, :T]                                       # rows not contiguous across the batch
    tau = 0.5 + torch.rand(B, T, device=DEVICE)
    kw = dict(ref_logprobs=refp, kl_coef=0.1, entropy_coef=0.05, temperature=tau, logit_scale=0.8,
              final_logit_softcapping=6.0)
    with count_launches() as launches:
        out = fastppo.fused_ppo_loss(view, labels, old, adv, mask, **kw)
        (out.loss * 1.7).backward()
    assert launches["fused_grad_fwd"] == 1
    grad = big.grad[:, :T]
    assert torch.equal(grad[dead], torch.zeros_like(grad[dead]))
    clean = torch.where(dead[..., None], 0.0, logits.double())
    rout, rgrad, _ = _run(ref.fused_ppo_loss, clean, labels, old, adv, mask, **{**kw, "temperature": tau[..., None]})
    _compare(out, rout, grad, rgrad, torch.bfloat16, tol=2e-4)


@pytest.mark.parametrize("case", ["gspo", "gspo_token", "gmpo", "dro", "entropy_quantile", "off_policy_mask",
                                  "kl_bias_correction", "cu_seqlens", "long_rows", "no_grad", "torch"])
def test_path_choice(monkeypatch, case):
    """Token-level losses on the Triton backend take the one-read path; the rest keep the two-pass path."""
    logits, labels, old, adv, mask, _ = _inputs(torch.float32, B=2, T=4, V=64)
    x = logits.clone().requires_grad_()
    kw = {}
    if case in ("gspo", "gspo_token", "gmpo"):
        kw["policy_loss"] = case
    elif case == "dro":
        kw.update(policy_loss="dro", dro_beta=0.1)
    elif case == "off_policy_mask":
        kw["off_policy_mask_threshold"] = 0.5
    elif case == "kl_bias_correction":
        kw.update(kl_bias_correction=True, ref_logprobs=old + 0.1, kl_coef=0.1)
    elif case == "entropy_quantile":
        kw["entropy_quantile"] = 0.5
    elif case == "cu_seqlens":
        x = x.reshape(8, 64)
        labels, old, adv, mask = (t.reshape(8) for t in (labels, old, adv, mask))
        kw["cu_seqlens"] = torch.tensor([0, 4, 8], device=DEVICE)
    elif case == "long_rows":
        monkeypatch.setattr(cfg, "FUSED_GRAD_MAX_V", 32)
    elif case == "no_grad":
        x = x.detach()
    with count_launches() as launches, fastppo.use_backend("torch" if case == "torch" else "triton"):
        out = fastppo.fused_ppo_loss(x, labels, old, adv, mask, **kw)
        if x.requires_grad:
            out.loss.backward()
    assert "fused_grad_fwd" not in launches and "fused_grad_rescale" not in launches
    if case != "torch":
        assert launches["logprobs_fwd"] == 1


def test_repeated_backward():
    """retain_graph: a second backward computes a new gradient from the logits (the first one, handed over,
    is not touched); with inplace=True, whose logits are gone, it raises."""
    logits, labels, old, adv, mask, refp = _inputs(torch.float32)
    x = logits.clone().requires_grad_()
    out = fastppo.fused_ppo_loss(x, labels, old, adv, mask, ref_logprobs=refp, kl_coef=0.1, entropy_coef=0.01)
    (g1,) = torch.autograd.grad(out.loss, x, retain_graph=True)
    first = g1.clone()
    (g2,) = torch.autograd.grad(out.loss, x, retain_graph=True)
    (g3,) = torch.autograd.grad(out.loss * 3.0, x)
    torch.testing.assert_close(g1, first, rtol=0, atol=0)
    torch.testing.assert_close(g2, first, rtol=0, atol=0)   # reentrant: the same numbers (gradcheck asks it)
    torch.testing.assert_close(g3, 3.0 * first, rtol=1e-6, atol=1e-9)
    y = logits.clone().requires_grad_()
    z = y * 1.0
    out = fastppo.fused_ppo_loss(z, labels, old, adv, mask, inplace=True)
    torch.autograd.grad(out.loss, y, retain_graph=True)
    with pytest.raises(RuntimeError, match="backward through this loss once"):
        torch.autograd.grad(out.loss, y)


def test_gradcheck_float64_softcap_temperature():
    logits = torch.randn(2, 3, 13, dtype=torch.float64, device=DEVICE, requires_grad=True)
    labels = make_labels((2, 3), 13, holes=0)
    old = torch.randn(2, 3, dtype=torch.float64, device=DEVICE) * 0.1 - 2.5
    adv = torch.randn(2, 3, dtype=torch.float64, device=DEVICE)
    isw = torch.rand(2, 3, dtype=torch.float64, device=DEVICE) + 0.5
    mask = torch.tensor([[1, 0, 1], [1, 1, 1]], dtype=torch.bool, device=DEVICE)

    def f(x):
        return fastppo.fused_ppo_loss(x, labels, old, adv, mask, ref_logprobs=old + 0.05, kl_coef=0.1,
                                      entropy_coef=0.05, policy_loss="sapo", rollout_is_weights=isw,
                                      temperature=0.8, final_logit_softcapping=4.0).loss

    assert torch.autograd.gradcheck(f, (logits,), eps=1e-6, atol=1e-6, fast_mode=True)


# ----------------------------------------------------------------------------- counters
def _traffic(prompt, V, upstream, one_pass, monkeypatch, Bc=4, Tc=8):
    """(bytes loaded + stored, every access counted; launches) of forward + backward, bf16, all labels valid,
    the first `prompt` of every sequence masked, KL and entropy bonus on."""
    torch.manual_seed(1)
    logits = make_logits((Bc, Tc, V), torch.bfloat16).requires_grad_()
    labels = torch.randint(0, V, (Bc, Tc), device=DEVICE)
    mask = torch.ones(Bc, Tc, dtype=torch.bool, device=DEVICE)
    mask[:, : round(prompt * Tc)] = False
    old, refp, adv = (torch.randn(Bc, Tc, device=DEVICE) - 5 for _ in range(3))
    monkeypatch.setattr(cfg, "FUSED_GRAD_MAX_V", 16384 if one_pass else 0)
    rec = TritonLaunches()
    with rec.count():
        out = fastppo.fused_ppo_loss(logits, labels, old, adv, mask, ref_logprobs=refp, kl_coef=0.1,
                                     entropy_coef=0.01)
        (out.loss * upstream).backward()
    names = {r["kernel"] for r in rec.log}
    assert ("_fused_grad_kernel" in names) == one_pass
    return sum(r["requested_bytes"] for r in rec.log), len(rec.log)


@pytest.mark.parametrize("prompt", [0.0, 0.5, 0.75])
def test_bytes_and_launches_at_prompt_fractions(monkeypatch, prompt):
    """Per logits element, forward + backward, bf16: one read and one write of a live row (4 bytes; 8 with a
    non-unit upstream gradient, which rewrites the row from the logits) against the two-pass 6; a dead row
    only gets its zero gradient (2). Measured as the slope of the counted bytes in V (the per-token bytes do
    not grow with V); the total against the floor 6 N_valid V + 2 N_dead V at V = 1024; 6 launches each."""
    Bc, Tc = 4, 8
    n_dead = Bc * round(prompt * Tc)
    n_live = Bc * Tc - n_dead
    per_elem = {}
    for key, upstream, one_pass in (("one", 1.0, True), ("one_scaled", 1.7, True), ("two", 1.0, False)):
        (b1, l1), (b2, l2) = (_traffic(prompt, v, upstream, one_pass, monkeypatch) for v in (512, 1024))
        assert l1 == l2 == 6
        per_elem[key] = (b2 - b1) / 512
        if key == "one":
            floor = 2 * 1024 * (3 * n_live + n_dead)
            ratio = b2 / floor
    assert per_elem["one"] == 2 * (2 * n_live + n_dead)
    assert per_elem["one_scaled"] == 2 * (4 * n_live + n_dead)
    assert per_elem["two"] == 2 * (3 * n_live + n_dead)
    exact = (2 * n_live + n_dead) / (3 * n_live + n_dead)            # 0.67, 0.75, 0.83
    assert exact <= ratio <= exact + 128 * Bc * Tc / floor            # + under 128 per-token bytes per row
    if prompt == 0.0:
        assert ratio <= 0.70


def test_opcheck_one_pass_ops():
    """Schemas, fake implementations, autograd registration of the ops behind the one-read path. (The AOT
    dispatch test is left out for the ops that hand a gradient held from forward to backward: torch.compile
    traces fused_ppo_loss's two-pass op instead, fastppo.fused_grad.takes_one_pass.)"""
    from fastppo.library import encode
    from fastppo.options import LogprobOptions, LossOptions

    logits, labels, old, adv, mask, refp = _inputs(torch.float32, B=2, T=3, V=40)
    lopts = encode(LogprobOptions(inv_tau=1 / 0.7, with_entropy=True, backend="triton", softcap=30.0))
    opts = encode(LossOptions.policy(policy_loss="sapo", kl_kind="k3", kl_coef=0.05, entropy_coef=0.01))
    args = (logits, labels, old, adv, mask, refp, None, lopts, opts)
    res = torch.library.opcheck(torch.ops.fastppo.fused_ppo_loss_grad, args)
    assert all(v == "SUCCESS" for v in res.values()), res
    res = torch.library.opcheck(torch.ops.fastppo.fused_ppo_loss_grad_inplace, (logits.clone(), *args[1:]),
                                test_utils=("test_schema", "test_faketensor"))
    assert all(v == "SUCCESS" for v in res.values()), res
    loss, logp, kl, ent, stats, lse, coef, coef_ent, grad = torch.ops.fastppo.fused_ppo_loss_grad(*args)
    x = logits.clone().requires_grad_()
    link = (loss, x, grad, labels, mask, lse, ent, coef, coef_ent, lopts, None)
    res = torch.library.opcheck(torch.ops.fastppo.fused_grad_link, link,
                                test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    assert all(v == "SUCCESS" for v in res.values()), res
    scale = torch.tensor(0.5)
    res = torch.library.opcheck(torch.ops.fastppo.fused_grad_rescale_,
                                (grad.clone(), logits, labels, lse, ent, coef, coef_ent, scale, mask, lopts, None),
                                test_utils=("test_schema", "test_faketensor"))
    assert all(v == "SUCCESS" for v in res.values()), res
    res = torch.library.opcheck(torch.ops.fastppo.fused_grad_scale_, (grad.clone(), labels, mask, scale, -100),
                                test_utils=("test_schema", "test_faketensor"))
    assert all(v == "SUCCESS" for v in res.values()), res
