"""fastppo.integrations.patch("verl"): every replaced verl function against verl's original on
random inputs with masks with holes (forward and gradient), reached the way verl reaches it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import verl.trainer.ppo.core_algos as ca  # noqa: E402
import verl.utils.torch_functional as tf  # noqa: E402
import verl.workers.utils.losses as vl  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

import fastppo.integrations as fi  # noqa: E402

pytestmark = pytest.mark.usefixtures("verl_torch_paths")


def _mask(B, T):
    m = (torch.rand(B, T) > 0.3).float()
    m[0] = 0.0            # an empty row
    m[1, :] = 1.0         # a full row
    m[2, 1::2] = 0.0      # holes
    return m


def _both(fn_name, module, *args, grad_of=(), **kwargs):
    """(original result, patched result) of module.fn_name; grads of the listed inputs too."""
    outs = []
    for patched in (False, True):
        ins = [a.detach().clone().requires_grad_(i in grad_of) if torch.is_tensor(a) else a
               for i, a in enumerate(args)]
        if patched:
            with fi.patch("verl") as h:
                res = getattr(module, fn_name)(*ins, **kwargs)
                stats = h.stats
        else:
            res = getattr(module, fn_name)(*ins, **kwargs)
            stats = None
        first = res[0] if isinstance(res, tuple) else res
        grads = []
        if grad_of:
            torch.manual_seed(1)
            (first * torch.randn_like(first)).sum().backward()
            grads = [ins[i].grad for i in grad_of]
        outs.append((res, grads, stats))
    return outs


def test_patch_handle_lists_and_undoes():
    orig = ca.kl_penalty
    with fi.patch("verl") as h:
        assert vl.kl_penalty is not orig and ca.kl_penalty is vl.kl_penalty
        assert "verl.workers.utils.losses.kl_penalty" in h.replaced["kl_penalty"]
        assert ca.get_policy_loss_fn("vanilla") is ca.compute_policy_loss_vanilla
        assert any("POLICY_LOSS_REGISTRY" in w for w in h.replaced["policy_loss_vanilla"])
        assert fi.patch("verl") is h   # idempotent
    assert ca.kl_penalty is orig and vl.kl_penalty is orig
    assert ca.get_policy_loss_fn("vanilla").__name__ == "compute_policy_loss_vanilla"
    with fi.patch("verl", ops=["kl_penalty"]) as h:
        assert list(h.replaced) == ["kl_penalty"]
        assert not hasattr(tf.logprobs_from_logits, "__fastppo_original__")
    with pytest.raises(ValueError, match="not entry points"):
        fi.patch("verl", ops=["nope"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logprobs_and_entropy(dtype):
    """Same dtype/shape as verl; error against the float64 formula no worse than verl's own plus
    the output dtype's rounding (verl computes bf16 logits in bf16, fastppo in fp32)."""
    logits = (torch.randn(3, 5, 97) * 3).to(dtype)
    labels = torch.randint(0, 97, (3, 5))
    z = logits.double()
    ref_logp = torch.log_softmax(z, -1).gather(-1, labels[..., None])[..., 0]
    ref_ent = torch.logsumexp(z, -1) - (torch.softmax(z, -1) * z).sum(-1)
    eps = torch.finfo(dtype).eps
    for name, args, ref in (("logprobs_from_logits", (logits, labels), ref_logp),
                            ("entropy_from_logits", (logits,), ref_ent)):
        (a, ga, _), (b, gb, st) = _both(name, tf, *args, grad_of=(0,))
        assert b.dtype == a.dtype and b.shape == a.shape and st.served[name] == 1
        err_host = (a.double() - ref).abs().max()
        err_ours = (b.double() - ref).abs().max()
        assert err_ours <= err_host + eps * (1 + ref.abs().max()), (name, err_ours, err_host)
        tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
        torch.testing.assert_close(gb[0].float(), ga[0].float(), **tol)


@pytest.mark.parametrize("kind", ["kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3", "k3+", "low_var_kl+"])
def test_kl_penalty(kind):
    logp = torch.randn(4, 7) * 3
    ref = torch.randn(4, 7) * 3
    ref[0, 0] = logp[0, 0] + 30   # beyond verl's clamps
    (a, ga, _), (b, gb, st) = _both("kl_penalty", vl, logp, ref, kind, grad_of=(0, 1))
    assert st.served["kl_penalty"] == 1 and b.dtype == a.dtype
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    for x, y in zip(gb, ga):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


def test_kl_full_delegates():
    with fi.patch("verl") as h, pytest.raises(NotImplementedError):
        ca.kl_penalty(torch.zeros(2), torch.zeros(2), "full")
    assert h.stats.delegated["kl_penalty"] == 1


def test_gae():
    B, T = 4, 9
    r, v, m = torch.randn(B, T), torch.randn(B, T), _mask(B, T)
    m[0, 3] = 1.0  # whiten needs some tokens
    (a, _, _), (b, _, st) = _both("compute_gae_advantage_return", ca, r, v, m, 0.97, 0.9)
    keep = m.bool()
    # verl carries the last value into mask-0 positions (never read by its losses); fastppo writes 0
    for x, y in zip(b, a):
        torch.testing.assert_close(x[keep], y[keep], rtol=1e-5, atol=1e-5)
    assert st.served["compute_gae_advantage_return"] == 1


@pytest.mark.parametrize("fn,kw", [("compute_grpo_outcome_advantage", {"norm_adv_by_std_in_grpo": True}),
                                   ("compute_grpo_outcome_advantage", {"norm_adv_by_std_in_grpo": False}),
                                   ("compute_rloo_outcome_advantage", {})])
def test_outcome_advantages_uneven_groups(fn, kw):
    B, T = 10, 6
    r = torch.zeros(B, T)
    r[:, -1] = torch.randn(B)
    m = _mask(B, T)
    index = np.array(["a", "b", "a", "c", "b", "a", "d", "c", "d", "e"], dtype=object)   # sizes 3, 2, 2, 2, 1
    (a, _, _), (b, _, st) = _both(fn, ca, r, m, index, **kw)
    for x, y in zip(b, a):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    assert st.served[fn] == 1
    assert ca.get_adv_estimator_fn("grpo") is ca.compute_grpo_outcome_advantage


@pytest.mark.parametrize("mode,dp", [("token-mean", 1), ("seq-mean-token-mean", 1), ("seq-mean-token-sum", 1),
                                     ("seq-mean-token-sum-norm", 1), ("token-sum", 1), ("token-sum", 2)])
def test_value_loss(mode, dp):
    B, T = 5, 8
    vp, ret, old, m = torch.randn(B, T), torch.randn(B, T), torch.randn(B, T), _mask(B, T)
    (a, ga, _), (b, gb, st) = _both("compute_value_loss", vl, vp, ret, old, m, 0.3, mode, dp, grad_of=(0,))
    torch.testing.assert_close(b[0], a[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b[1].float(), a[1].float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gb[0], ga[0], rtol=1e-5, atol=1e-7)
    assert st.served["compute_value_loss"] == 1


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("info", [{}, {"dp_size": 2, "batch_num_tokens": 40, "global_batch_size": 12}])
def test_vanilla_policy_loss_via_registry(mode, info):
    B, T = 6, 7
    logp, old = torch.randn(B, T) * 0.3, torch.randn(B, T) * 0.3
    adv, m = torch.randn(B, T), _mask(B, T)
    cfg = OmegaConf.create({"clip_ratio": 0.2, "clip_ratio_low": 0.1, "clip_ratio_high": 0.28, "clip_ratio_c": 3.0,
                            "global_batch_info": info})
    res = []
    for patched in (False, True):
        lp = logp.clone().requires_grad_()
        if patched:
            with fi.patch("verl") as h:
                loss, metrics = ca.get_policy_loss_fn("vanilla")(old, lp, adv, m, mode, cfg, None)
            assert h.stats.served["policy_loss_vanilla"] == 1
        else:
            loss, metrics = ca.get_policy_loss_fn("vanilla")(old, lp, adv, m, mode, cfg, None)
        loss.backward()
        res.append((loss, metrics, lp.grad))
    (a, ma, ga), (b, mb, gb) = res
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gb, ga, rtol=1e-5, atol=1e-7)
    assert mb.keys() == ma.keys()
    for k in ma:
        assert mb[k] == pytest.approx(ma[k], rel=1e-5, abs=1e-6), k


def test_fused_linear_for_ppo():
    import verl.utils.experimental.torch_functional as xtf

    h0, w0 = torch.randn(2, 9, 16), torch.randn(70, 16) * 0.5
    ids = torch.randint(0, 70, (2, 9))
    gl, ge = torch.randn(2, 9), torch.randn(2, 9)
    res = []
    for patched in (False, True):
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        if patched:
            with fi.patch("verl", ops=["FusedLinearForPPO"]) as hd:
                logp, ent = xtf.FusedLinearForPPO()(h, w, ids, temperature=0.8)
            assert hd.stats.served["FusedLinearForPPO"] == 1
        else:
            logp, ent = xtf.FusedLinearForPPO()(h, w, ids, temperature=0.8)
        ((logp * gl).sum() + (ent * ge).sum()).backward()
        res.append((logp, ent, h.grad, w.grad))
    for a, b in zip(*res):
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def _verl_batch(B=3, P=4, R=5):
    """A verl micro-batch as its workers hand it to the loss functions: padded prompts/responses,
    the model's outputs unpadded over the attention mask's tokens."""
    from tensordict import TensorDict

    prompt_len, resp_len = [4, 2, 3], [5, 3, 4]
    am = torch.zeros(B, P + R, dtype=torch.long)
    for i in range(B):
        am[i, P - prompt_len[i]:P] = 1
        am[i, P:P + resp_len[i]] = 1
    data = TensorDict({"prompts": torch.randint(0, 9, (B, P)), "responses": torch.randint(0, 9, (B, R)),
                       "attention_mask": am, "response_mask": am[:, P:].clone(),
                       "old_log_probs": torch.randn(B, R) * 0.1 - 1, "ref_log_prob": torch.randn(B, R) * 0.1 - 1,
                       "advantages": torch.randn(B, R), "values": torch.randn(B, R), "returns": torch.randn(B, R)},
                      batch_size=[B])
    data.set_non_tensor("dp_size", 1)
    data.set_non_tensor("batch_num_tokens", None)
    data.set_non_tensor("global_batch_size", None)
    return data, int(am.sum())


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_verl_workers_ppo_loss_and_value_loss_run_patched(agg):
    """verl.workers.utils.losses.ppo_loss / value_loss (the functions verl's engine workers call):
    patched loss, metrics and gradients equal the unpatched ones, and fastppo served the calls."""
    data, nnz = _verl_batch()
    cfg = OmegaConf.create({"global_batch_info": {}, "loss_scale_factor": None, "loss_agg_mode": agg,
                            "policy_loss": {"loss_mode": "vanilla"}, "clip_ratio": 0.2, "clip_ratio_low": 0.2,
                            "clip_ratio_high": 0.28, "clip_ratio_c": 3.0, "entropy_coeff": 0.0, "use_kl_loss": True,
                            "kl_loss_type": "low_var_kl", "kl_loss_coef": 0.1, "cliprange_value": 0.5})
    lp0, v0 = torch.randn(nnz) * 0.1 - 1, torch.randn(nnz)
    res = []
    for patched in (False, True):
        lp, v = lp0.clone().requires_grad_(), v0.clone().requires_grad_()
        with fi.patch("verl") if patched else _Null() as h:
            pl, pm = vl.ppo_loss(cfg, {"log_probs": lp}, data)
            vfl, vm = vl.value_loss(cfg, {"values": v}, data)
            if h is not None:
                assert h.stats.served["policy_loss_vanilla"] == 1 and h.stats.served["kl_penalty"] == 1
                assert h.stats.served["compute_value_loss"] == 1 and not h.stats.delegated
        (pl + vfl).backward()
        res.append((pl, vfl, lp.grad, v.grad, pm, vm))
    (*a, pma, vma), (*b, pmb, vmb) = res
    for x, y in zip(b, a):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    # critic/vf_clipfrac is not compared: verl clips v itself (v_c == v inside the range), fastppo's
    # v_c = old + clamp(v - old) can differ from v by rounding and count such a tie as clipped
    for k in ("actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower"):
        assert pmb[k].aggregate() == pytest.approx(pma[k].aggregate(), rel=1e-5, abs=1e-6), k


class _Null:
    def __enter__(self):
        return None

    def __exit__(self, *e):
        return False


# ----------------------------------------------------------------------------- the policy-loss registry
_AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm", "token-sum")
_GLOBAL = {"dp_size": 2, "batch_num_tokens": 40, "global_batch_size": 12, "loss_scale_factor": 5}


def _actor_config(loss_mode="vanilla", info=None, **kw):
    from verl.workers.config import ActorConfig, PolicyLossConfig

    cfg = ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, clip_ratio=0.2,
                      clip_ratio_low=0.1, clip_ratio_high=0.28, tau_pos=1.0, tau_neg=1.05,
                      policy_loss=PolicyLossConfig(loss_mode=loss_mode), **kw)
    cfg.global_batch_info.update(info or {})
    return cfg


def _policy_inputs(B=6, T=7, dtype=torch.float32):
    logp, old = torch.randn(B, T) * 0.3, torch.randn(B, T) * 0.3
    logp[3, 0] += 25.0    # beyond verl's [-20, 20] clamp of the token log-ratio
    logp[4] += 12.0       # a sequence mean log-ratio beyond gspo's cap of 10
    adv, m = torch.randn(B, T), _mask(B, T)
    return logp.to(dtype), old.to(dtype), adv.to(dtype), m


def _run_policy_loss(fn, old, logp, adv, m, mode, cfg, isw, g):
    lp = logp.clone().requires_grad_()
    args = (old, lp, adv, m) + (() if mode is None else (mode,))
    loss, metrics = fn(*args, config=cfg, rollout_is_weights=isw)
    (loss * g).backward()
    return loss, metrics, lp.grad


def _assert_same_policy_loss(a, b, scale):
    (la, ma, ga), (lb, mb, gb) = a, b
    assert lb.dtype == la.dtype and lb.shape == la.shape
    torch.testing.assert_close(lb, la, rtol=1e-5, atol=2e-6 * scale)
    torch.testing.assert_close(gb, ga, rtol=1e-5, atol=1e-7 * scale)
    assert mb.keys() == ma.keys() and all(isinstance(v, float) for v in mb.values())
    for k in ma:
        assert mb[k] == pytest.approx(ma[k], rel=1e-5, abs=1e-6), k


@pytest.mark.parametrize("name", ["vanilla", "gspo", "sapo", "gpg", "geo_mean", "cispo"])
def test_policy_loss_registry_modes(name):
    """Every verl registry loss fastppo serves, patched vs verl's original: every loss_agg_mode with
    rollout IS weights and verl's global batch info (dp_size 2: token-sum's dp_size scaling), and the
    host's defaults (its own loss_agg_mode, no weights, a bool mask); an empty row, holes, a token
    beyond the [-20, 20] clamp and a sequence beyond gspo's cap of 10; loss, gradient (upstream not
    one), metrics keys and values; every call served by fastppo (none delegated)."""
    torch.manual_seed(0)
    logp, old, adv, m = _policy_inputs()
    isw = torch.rand_like(logp) * 2
    g = torch.tensor(0.7)
    cases = [(mode, m, isw, _GLOBAL) for mode in _AGGS] + [(None, m.bool(), None, {})]
    original = ca.get_policy_loss_fn(name)
    want = [_run_policy_loss(original, old, logp, adv, mm, mode, _actor_config(info=info), w, g)
            for mode, mm, w, info in cases]
    with fi.patch("verl", ops=[f"policy_loss_{name}"]) as h:
        fn = ca.get_policy_loss_fn(name)
        assert fn.__fastppo_original__ is original
        got = [_run_policy_loss(fn, old, logp, adv, mm, mode, _actor_config(info=info), w, g)
               for mode, mm, w, info in cases]
        assert h.stats.served[f"policy_loss_{name}"] == len(cases) and not h.stats.delegated
    scale = float((adv.abs() * m).sum())   # magnitude of the token-sum losses
    for a, b in zip(want, got):
        _assert_same_policy_loss(a, b, max(1.0, scale / 10))


@pytest.mark.parametrize("name,mode,bool_mask", [("gspo", None, False), ("geo_mean", None, True),
                                                 ("sapo", "token-mean", True), ("cispo", "token-mean", True),
                                                 ("vanilla", "token-sum", False)])
def test_policy_loss_registry_bf16(name, mode, bool_mask):
    """bf16 inputs: verl's result dtype (bf16, or float32 where its agg divides by float32 counts or
    multiplies by a float mask); verl computes in bf16, fastppo in fp32 and rounds once, so both are
    compared with the float64 evaluation of verl's own formula."""
    torch.manual_seed(1)
    logp, old, adv, m = _policy_inputs()
    logp, old = logp * 0.1, old * 0.1   # ratios near one: bf16 resolves them
    m = m.bool() if bool_mask else m
    g = torch.tensor(1.0)
    original = ca.get_policy_loss_fn(name)
    cfg = _actor_config()
    bf = [t.bfloat16() for t in (old, logp, adv)]
    ref = _run_policy_loss(original, old.double(), logp.double(), adv.double(), m, mode, cfg, None, g)
    host = _run_policy_loss(original, *bf, m, mode, cfg, None, g)
    with fi.patch("verl", ops=[f"policy_loss_{name}"]) as h:
        ours = _run_policy_loss(ca.get_policy_loss_fn(name), *bf, m, mode, cfg, None, g)
        assert h.stats.served[f"policy_loss_{name}"] == 1
    assert ours[0].dtype == host[0].dtype and ours[2].dtype == host[2].dtype == torch.bfloat16
    err_host = (host[0].double() - ref[0]).abs()
    assert (ours[0].double() - ref[0]).abs() <= err_host + 2 ** -8 * ref[0].abs() + 1e-6
    torch.testing.assert_close(ours[2].double(), ref[2], rtol=2e-2, atol=2e-2 * ref[2].abs().max().item())


def test_policy_loss_registry_delegates_what_verl_decides():
    """A config verl's assertion rejects, and IS weights that carry a gradient (verl back-propagates
    into them), go to verl's original, counted as delegated."""
    logp, old, adv, m = _policy_inputs()
    with fi.patch("verl", ops=["policy_loss_gspo", "policy_loss_cispo"]) as h:
        with pytest.raises(AssertionError):
            ca.get_policy_loss_fn("gspo")(old, logp, adv, m, "token-mean", OmegaConf.create({"clip_ratio": 0.2}))
        isw = torch.rand_like(logp).requires_grad_()
        loss, _ = ca.get_policy_loss_fn("cispo")(old, logp, adv, m, "token-mean", _actor_config(), isw)
        loss.backward()
        assert isw.grad is not None
        assert h.stats.delegated["policy_loss_gspo"] == 1 and h.stats.delegated["policy_loss_cispo"] == 1
        assert not h.stats.served


@pytest.mark.parametrize("loss_mode,agg", [("gspo", "seq-mean-token-mean"), ("geo_mean", "token-mean"),
                                           ("cispo", "token-sum")])
def test_verl_workers_ppo_loss_new_modes(loss_mode, agg):
    """verl.workers.utils.losses.ppo_loss with an ActorConfig selecting a newer registry loss and
    rollout_is_weights in the batch: patched loss, metrics and gradients equal the unpatched ones."""
    data, nnz = _verl_batch()
    data["rollout_is_weights"] = torch.rand(3, 5) * 1.5
    lp0 = torch.randn(nnz) * 0.1 - 1
    res = []
    for patched in (False, True):
        cfg = _actor_config(loss_mode, loss_agg_mode=agg, use_kl_loss=True, kl_loss_coef=0.1)
        lp = lp0.clone().requires_grad_()
        with fi.patch("verl") if patched else _Null() as h:
            pl, pm = vl.ppo_loss(cfg, {"log_probs": lp}, data)
            if h is not None:
                assert h.stats.served[f"policy_loss_{loss_mode}"] == 1 and not h.stats.delegated
        pl.backward()
        res.append((pl, lp.grad, pm))
    (a, ga, ma), (b, gb, mb) = res
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gb, ga, rtol=1e-5, atol=1e-7)
    assert mb.keys() == ma.keys()
    for k in ("actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower"):
        assert mb[k].aggregate() == pytest.approx(ma[k].aggregate(), rel=1e-5, abs=1e-6), k
