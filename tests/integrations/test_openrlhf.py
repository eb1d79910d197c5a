"""fastppo.integrations.patch("openrlhf"): OpenRLHF's functions and loss modules against the
originals on random inputs with masks with holes (forward and gradient)."""

from __future__ import annotations

import ast
import importlib.util
import sys
import types
from pathlib import Path

import pytest
import torch

# flash-attn's CUDA extension cannot load on a CPU machine, and `import flash_attn` loads it; OpenRLHF
# only needs flash_attn's pure-Python submodules (bert_padding, utils.distributed) at import time,
# so load those from the installed package without running its __init__ (CI installs flash-attn
# with FLASH_ATTENTION_SKIP_CUDA_BUILD=TRUE, see .ci/run).
_fa = importlib.util.find_spec("flash_attn")
if _fa is not None and "flash_attn" not in sys.modules:
    _pkg = types.ModuleType("flash_attn")
    _pkg.__path__ = list(_fa.submodule_search_locations)
    _pkg.__spec__ = _fa
    sys.modules["flash_attn"] = _pkg

import openrlhf.models as om  # noqa: E402  (CI installs OpenRLHF: .ci/run)
import openrlhf.models.actor as oa  # noqa: E402
import openrlhf.models.loss as ol  # noqa: E402
import openrlhf.models.utils as ou  # noqa: E402

import fastppo.integrations as fi  # noqa: E402
import fastppo.integrations.openrlhf as fo  # noqa: E402


def _mask(B, T):
    m = (torch.rand(B, T) > 0.3).float()
    m[0, :2] = 1.0
    m[1, :] = 1.0
    m[2, 1::2] = 0.0
    return m


def test_rebinds_names_imported_elsewhere():
    orig_kl, orig_pl = ou.compute_approx_kl, ol.PolicyLoss
    with fi.patch("openrlhf") as h:
        assert oa.log_probs_from_logits is ou.log_probs_from_logits is not None
        assert oa.compute_entropy.__fastppo_original__ is not None
        assert om.PolicyLoss is ol.PolicyLoss and issubclass(ol.PolicyLoss, orig_pl)
        assert "openrlhf.models.PolicyLoss" in h.replaced["PolicyLoss"]
    assert ou.compute_approx_kl is orig_kl and om.PolicyLoss is orig_pl


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_entropy(temperature, monkeypatch):
    # OpenRLHF's fp32 path tries flash-attn's Triton cross-entropy (CUDA only) first; on CPU take
    # its own fallback, as on a machine without flash-attn
    monkeypatch.setitem(sys.modules, "flash_attn.ops.triton.cross_entropy", None)
    logits = torch.randn(3, 6, 101) * 4
    labels = torch.randint(0, 101, (3, 6))
    g1, g2 = torch.randn(3, 6), torch.randn(3, 6)   # upstream gradients, not all ones
    res = []
    for patched in (False, True):
        z = logits.clone().requires_grad_()
        # OpenRLHF's compute_entropy is @torch.compile'd: its own body runs eagerly here (force_eager), the same
        # formula without inductor's C++ build of two graphs on CPU (about 30 s of the suite); fastppo under
        # torch.compile is tests/ops/test_compile.py's
        with fi.patch("openrlhf") if patched else torch.compiler.set_stance("force_eager"):
            zs = z * 1.0   # OpenRLHF divides in place: give it a non-leaf
            lp = ou.log_probs_from_logits(zs, labels, temperature=temperature)
            ent = ou.compute_entropy(zs)
        ((lp * g1).sum() + (ent * g2).sum()).backward()
        res.append((lp, ent, zs.detach(), z.grad))
    for x, y in zip(*res):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *e):
        return False


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_compute_approx_kl(kind):
    lp, base = torch.randn(4, 9) * 4, torch.randn(4, 9) * 4
    base[0, 0], base[0, 1] = lp[0, 0] + 25, lp[0, 1] - 25   # past the +-10 clamps
    res = []
    for patched in (False, True):
        x, y = lp.clone().requires_grad_(), base.clone().requires_grad_()
        with fi.patch("openrlhf") if patched else _null():
            kl = ou.compute_approx_kl(x, y, kl_estimator=kind)
        (kl * torch.linspace(-1, 2, kl.numel()).view_as(kl)).sum().backward()
        res.append((kl, x.grad, y.grad))
    for a, b in zip(*res):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("token_level", [True, False])
@pytest.mark.parametrize("dual_clip", [None, 3.0])
@pytest.mark.parametrize("counts", [{}, {"dp_size": 2, "batch_num_tokens": 30.0, "global_batch_size": 10.0}])
def test_policy_and_value_loss(token_level, dual_clip, counts):
    B, T = 5, 8
    lp, old, adv, m = torch.randn(B, T) * 0.3, torch.randn(B, T) * 0.3, torch.randn(B, T), _mask(B, T)
    v, ov, ret = torch.randn(B, T), torch.randn(B, T), torch.randn(B, T)
    res = []
    for patched in (False, True):
        x, vx = lp.clone().requires_grad_(), v.clone().requires_grad_()
        with fi.patch("openrlhf") if patched else _null():
            pl = ol.PolicyLoss(0.2, 0.28, dual_clip=dual_clip, token_level_loss=token_level)
            vl = ol.ValueLoss(0.2, token_level_loss=token_level)
            loss, clip_ratio, ppo_kl, vllm_kl, filt = pl(x, old, adv, m, **counts)
            vloss = vl(vx, ov, ret, m, **counts)
            if patched:
                assert type(pl).__fastppo_original__ is not None
        (loss + vloss).backward()
        res.append((loss, clip_ratio, ppo_kl, vloss, x.grad, vx.grad))
        assert vllm_kl is None and filt is None
    for a, b in zip(*res):
        torch.testing.assert_close(b.float(), a.float(), rtol=1e-5, atol=1e-6)


def _host_gae():
    """OpenRLHF's own get_advantages_and_returns, compiled from its source (its module imports vLLM,
    which a CPU CI does not install)."""
    path = Path(importlib.util.find_spec("openrlhf").submodule_search_locations[0], "trainer", "ppo_utils",
                "experience_maker.py")
    tree = ast.parse(path.read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "RemoteExperienceMaker")
    fn = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "get_advantages_and_returns")
    ns = {"torch": torch, "Tuple": tuple}
    exec(compile(ast.Module([fn], []), str(path), "exec"), ns)
    return ns["get_advantages_and_returns"]


def test_gae_keeps_openrlhf_semantics():
    host = _host_gae()
    stats = fi._patching.CallStats()
    ours = fo.build_gae(host, stats)
    B, T = 4, 11
    v, r, m = torch.randn(B, T), torch.randn(B, T), _mask(B, T)
    a = host(None, v, r, m, 0.95, 0.9)
    b = ours(None, v, r, m, 0.95, 0.9)
    for x, y in zip(b, a):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
    assert stats.served["get_advantages_and_returns"] == 1


# ----------------------------------------------------------------------------- GSPO and the IS correction
_COUNTS = {"dp_size": 2, "batch_num_tokens": 30.0, "global_batch_size": 10.0}


def _policy_case(B=6, T=8):
    torch.manual_seed(3)
    lp, old = torch.randn(B, T) * 0.3, torch.randn(B, T) * 0.3
    roll = old + torch.randn(B, T) * 0.3      # the rollout engine's log-probs: IS ratios around [0.5, 2]
    adv, m = torch.randn(B, T), _mask(B, T)
    m[3] = 0.0                                 # an empty row
    return lp, old, roll, adv, m


def _policy_pair(kwargs, lp, old, roll, adv, m, counts, served=True):
    """(original outputs, patched outputs) of PolicyLoss(**kwargs): the five returned values and the
    gradient of the log-probs under a non-unit upstream gradient; asserts who computed the patched one."""
    res = []
    for cls_of in (lambda: ol.PolicyLoss.__fastppo_original__, lambda: ol.PolicyLoss):
        x = lp.clone().requires_grad_()
        out = cls_of()(**kwargs)(x, old, adv, m, rollout_log_probs=roll, **counts)
        (out[0] * 1.3).backward()
        res.append((*out, x.grad))
    return res


@pytest.mark.parametrize("kwargs", [
    {"policy_loss_type": "gspo"},
    {"policy_loss_type": "gspo", "is_correction_level": "token"},   # GSPO's ratio against the rollout policy
    {"is_correction_level": "token", "is_correction_mode": "clip", "is_correction_threshold": (0.8, 1.25)},
    {"is_correction_level": "token", "is_correction_mode": "mask", "is_correction_threshold": (0.8, 1.25)},
    {"is_correction_level": "token", "is_correction_mode": "mask", "dual_clip": 3.0, "token_level_loss": False},
    {"is_correction_level": "token", "is_correction_mode": "clip", "is_correction_threshold": (0.0, 1.5),
     "dual_clip": 2.0},
    # seq-mask-tis: the sequence's geometric-mean ratio gates its token weights (rows gated in and out)
    {"is_correction_level": "seq", "is_correction_mode": "mask", "is_correction_threshold": (0.9, 1.1)},
    {"is_correction_level": "seq", "is_correction_threshold": (0.0, 1.05), "dual_clip": 3.0, "token_level_loss": False},
    # the binary_kl / tv gates (rollout_correction's is_gate), token and sequence level
    {"is_correction_level": "token", "is_correction_gating": "binary_kl", "is_correction_threshold": (0.0, 0.05)},
    {"is_correction_level": "token", "is_correction_gating": "tv", "is_correction_threshold": (0.0, 0.1),
     "token_level_loss": False, "dual_clip": 3.0},
    {"is_correction_level": "seq", "is_correction_gating": "binary_kl", "is_correction_threshold": (0.0, 0.1)},
    {"is_correction_level": "seq", "is_correction_gating": "tv", "is_correction_threshold": (0.0, 0.1),
     "token_level_loss": False},
    # GSPO with a dual clip: ppo (dual clip) on the sequence's mean log-ratio, with and without IS correction
    {"policy_loss_type": "gspo", "dual_clip": 1.5},
    {"policy_loss_type": "gspo", "dual_clip": 2.0, "is_correction_level": "token", "clip_eps_low": 0.1},
])
@pytest.mark.parametrize("counts", [{}, _COUNTS])
def test_policy_loss_gspo_and_is_correction(kwargs, counts):
    """OpenRLHF's GSPO (sequence-mean ratio, gradient through the mean, per-sample loss) and its
    token-level ratio IS correction (clip = truncate, mask = reject) served by ppo_policy_loss with
    policy_loss="gspo" / rollout_is_weights: all five outputs (loss, clip ratio, ppo_kl, vllm_kl,
    filter ratio) and the gradient equal OpenRLHF's; an empty row and holes in the mask."""
    lp, old, roll, adv, m = _policy_case()
    if kwargs.get("dual_clip") and kwargs.get("policy_loss_type") == "gspo":
        lp = lp + torch.tensor([[-0.6], [0.4], [0.0], [0.0], [-0.5], [0.5]])   # sequence ratios outside the clip
    with fi.patch("openrlhf", ops=["PolicyLoss"]) as h:
        want, got = _policy_pair({"clip_eps_low": 0.2, "clip_eps_high": 0.28, **kwargs}, lp, old, roll, adv, m, counts)
        assert h.stats.served["PolicyLoss"] == 1 and not h.stats.delegated
    if kwargs.get("is_correction_gating"):
        assert 0 < want[4] < 1, "the gate must drop some units and keep others"
    for a, b in zip(want, got):
        if a is None:
            assert b is None
            continue
        assert b.dtype == a.dtype and b.shape == a.shape
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert (got[3] is None) == (kwargs.get("is_correction_level", "off") == "off" or kwargs.get("policy_loss_type")
                                == "gspo")


@pytest.mark.parametrize("kwargs", [
    {"is_correction_level": "token", "is_correction_gating": "tv", "is_correction_threshold": (-0.1, 0.5)},
    {"is_correction_level": "token", "is_correction_threshold": (0.5, float("inf"))},
])
def test_policy_loss_delegates_other_rules(kwargs):
    lp, old, roll, adv, m = _policy_case()
    with fi.patch("openrlhf", ops=["PolicyLoss"]) as h:
        want, got = _policy_pair(kwargs, lp, old, roll, adv, m, {})
        assert h.stats.delegated["PolicyLoss"] == 1 and not h.stats.served
    for a, b in zip(want, got):
        assert (a is None and b is None) or torch.equal(a, b)


def test_policy_loss_gspo_beyond_fastppo_cap_delegates():
    """A sequence whose mean log-ratio exceeds 10: fastppo's gspo caps it (verl's rule), OpenRLHF does
    not, so that call is OpenRLHF's own (counted as delegated) and the numbers are OpenRLHF's."""
    lp, old, roll, adv, m = _policy_case()
    lp[1] += 11.0
    with fi.patch("openrlhf", ops=["PolicyLoss"]) as h:
        want, got = _policy_pair({"policy_loss_type": "gspo"}, lp, old, roll, adv, m, {})
        assert h.stats.delegated["PolicyLoss"] == 1 and not h.stats.served
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)


def test_policy_loss_gspo_dual_clip_beyond_ppo_clamp_delegates():
    """GSPO + dual clip runs as ppo on the sequence's mean log-ratio, which ppo clamps at 20 (OpenRLHF's gspo
    does not): a sequence past it is OpenRLHF's own call, counted as delegated."""
    lp, old, roll, adv, m = _policy_case()
    lp[1] += 21.0
    with fi.patch("openrlhf", ops=["PolicyLoss"]) as h:
        want, got = _policy_pair({"policy_loss_type": "gspo", "dual_clip": 3.0}, lp, old, roll, adv, m, {})
        assert h.stats.delegated["PolicyLoss"] == 1 and not h.stats.served
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)


@pytest.mark.parametrize("kwargs, counts, served", [
    ({}, {}, True),
    ({"dual_clip": 3.0, "is_correction_level": "token", "is_correction_threshold": (0.8, 1.25)}, {}, True),
    ({"is_correction_level": "seq", "is_correction_gating": "tv", "is_correction_threshold": (0.0, 0.1)}, {}, True),
    ({"token_level_loss": False}, {}, False),                       # OpenRLHF raises: its own error
    ({}, {"batch_num_tokens": 30.0}, False),
    ({"policy_loss_type": "gspo"}, {}, False),
])
def test_policy_loss_without_action_mask(kwargs, counts, served):
    """action_mask=None: OpenRLHF's masked_mean(x, None) is the plain mean, so every token counts; where its own
    code needs the mask (sequence-level loss, global token counts, GSPO) it raises, and the adapter lets it."""
    lp, old, roll, adv, _ = _policy_case()

    def run():
        x = lp.clone().requires_grad_()
        try:
            out = ol.PolicyLoss(**kwargs)(x, old, adv, None, rollout_log_probs=roll, **counts)
        except (TypeError, AttributeError) as e:
            return type(e)
        (out[0] * 1.3).backward()
        return (*out, x.grad)

    want = run()
    with fi.patch("openrlhf", ops=["PolicyLoss"]) as h:
        got = run()
        assert (h.stats.served["PolicyLoss"], h.stats.delegated["PolicyLoss"]) == ((1, 0) if served else (0, 1))
    if not served:
        assert isinstance(want, type) and got is want
        return
    for a, b in zip(want, got):
        if a is None:
            assert b is None
            continue
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
@pytest.mark.parametrize("with_old", [False, True])
def test_compute_approx_kl_unbiased_gradient(kind, with_old):
    """unbiased_gradient=True: the estimator's (clamped) value, the gradient of w (logp - base)^2 / 2 with the
    detached IS weight w = min(exp(logp - old), KL_IS_WEIGHT_CLIP) (1 without old), both inputs differentiated."""
    torch.manual_seed(5)
    lp, base = torch.randn(4, 9) * 2, torch.randn(4, 9) * 2
    old = lp + torch.randn(4, 9) if with_old else None
    if with_old:
        old[0, :3] = lp[0, :3] - 4.0   # w past KL_IS_WEIGHT_CLIP
    base[0, 0] = lp[0, 0] + 25         # past the +-10 value clamp
    up = torch.linspace(-1, 2, lp.numel()).view_as(lp)
    res = []
    for patched in (False, True):
        x, y = lp.clone().requires_grad_(), base.clone().requires_grad_()
        with fi.patch("openrlhf", ops=["compute_approx_kl"]) if patched else _null() as h:
            kl = ou.compute_approx_kl(x, y, log_probs_old=old, kl_estimator=kind, unbiased_gradient=True)
            if patched:
                assert h.stats.served["compute_approx_kl"] == 1 and not h.stats.delegated
        (kl * up).sum().backward()
        res.append((kl, x.grad, y.grad))
    for a, b in zip(*res):
        torch.testing.assert_close(b, a, rtol=2e-6, atol=1e-6)
    # against float64 of the documented formula
    d = lp.double() - base.double()
    w = torch.ones_like(d) if old is None else (lp.double() - old.double()).exp().clamp(max=ou.KL_IS_WEIGHT_CLIP)
    torch.testing.assert_close(res[1][1].double(), up.double() * w * d, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(res[1][2].double(), -up.double() * w * d, rtol=1e-5, atol=1e-5)
