import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastppo
from fastppo import reference as ref
from fastppo.kernels.launches import count_launches
from tests.helpers import DEVICE


def _random_mask(B, T, kind):
    if kind == "holes":
        return torch.rand(B, T, device=DEVICE) > 0.3
    lengths = torch.randint(0, T + 1, (B,), device=DEVICE)
    pos = torch.arange(T, device=DEVICE).expand(B, T)
    if kind == "right":             # response then right padding
        return pos < lengths[:, None]
    return pos >= (T - lengths)[:, None]   # left padding


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["holes", "right", "left"])
@pytest.mark.parametrize("B,T", [(4, 1), (3, 37), (2, 1500)])
@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.99, 0.95), (0.5, 0.0)])
def test_gae_matches_reference_loop(kind, B, T, gamma, lam):
    r, v = torch.randn(B, T, device=DEVICE), torch.randn(B, T, device=DEVICE)
    mask = _random_mask(B, T, kind)
    adv, ret = fastppo.gae(r, v, mask, gamma=gamma, lam=lam)
    radv, rret = ref.gae(r, v, mask, gamma=gamma, lam=lam)
    _close(adv, radv)
    _close(ret, rret)
    assert (adv[~mask] == 0).all() and (ret[~mask] == 0).all()


def test_gae_one_launch_for_long_sequences():
    B, T = 2, 4096
    r, v = torch.randn(B, T, device=DEVICE) * 0.1, torch.randn(B, T, device=DEVICE)
    mask = _random_mask(B, T, "holes")
    with count_launches() as launches:
        adv, ret = fastppo.gae(r, v, mask, gamma=0.999, lam=0.97)
    assert launches == {"gae": 1}
    radv, rret = ref.gae(r, v, mask, gamma=0.999, lam=0.97)
    torch.testing.assert_close(adv, radv, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(ret, rret, rtol=1e-5, atol=2e-5)


def test_gae_values_at_masked_positions_never_matter():
    r, v = torch.randn(3, 50, device=DEVICE), torch.randn(3, 50, device=DEVICE)
    mask = _random_mask(3, 50, "holes")
    a1, r1 = fastppo.gae(r, v, mask, gamma=0.9, lam=0.8)
    v2 = torch.where(mask, v, torch.full_like(v, 1e6))
    r2 = torch.where(mask, r, torch.full_like(r, -7.0))
    a2, rr2 = fastppo.gae(r2, v2, mask, gamma=0.9, lam=0.8)
    torch.testing.assert_close(a1, a2)
    torch.testing.assert_close(r1, rr2)


@settings(max_examples=25, deadline=None)
@given(B=st.integers(1, 4), T=st.integers(1, 70), seed=st.integers(0, 10_000))
def test_gae_unit_discount_is_masked_reverse_cumsum(B, T, seed):
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(B, T, generator=g).to(DEVICE)
    v = torch.randn(B, T, generator=g).to(DEVICE)
    mask = (torch.rand(B, T, generator=g) > 0.4).to(DEVICE)
    adv, _ = fastppo.gae(r, v, mask, gamma=1.0, lam=1.0)
    # with gamma = lam = 1 the values telescope over the unmasked tokens: A_t = sum_{s>=t, m_s} r_s - V_t
    rm = torch.where(mask, r, torch.zeros_like(r))
    suffix = rm.flip(-1).cumsum(-1).flip(-1)
    expected = torch.where(mask, suffix - v, torch.zeros_like(v))
    torch.testing.assert_close(adv, expected, rtol=1e-5, atol=1e-5)


def test_gae_bf16_inputs_and_strided():
    base = torch.randn(4, 80, device=DEVICE)
    r = base[:, ::2].to(torch.bfloat16)
    v = torch.randn(40, 4, device=DEVICE).t()
    mask = _random_mask(4, 40, "right").to(torch.float32)
    adv, ret = fastppo.gae(r, v, mask, gamma=0.95, lam=0.9)
    radv, rret = ref.gae(r.float(), v, mask, gamma=0.95, lam=0.9)
    _close(adv, radv)
    _close(ret, rret)


def test_gae_torch_backend_matches():
    r, v = torch.randn(3, 33, device=DEVICE), torch.randn(3, 33, device=DEVICE)
    mask = _random_mask(3, 33, "holes")
    a, b = fastppo.gae(r, v, mask, gamma=0.97, lam=0.9)
    with fastppo.use_backend("torch"):
        a2, b2 = fastppo.gae(r, v, mask, gamma=0.97, lam=0.9)
    _close(a, a2)
    _close(b, b2)


def test_gae_bad_arguments():
    r = torch.randn(2, 5)
    with pytest.raises(ValueError, match="gamma"):
        fastppo.gae(r, r, r > 0, gamma=1.5)
    with pytest.raises(ValueError, match="mask shape"):
        fastppo.gae(r, r, r[:, :3] > 0)
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        fastppo.gae(r[0], r[0], r[0] > 0)


@pytest.mark.parametrize("shift_mean", [True, False])
def test_masked_whiten(shift_mean):
    x = torch.randn(4, 30, device=DEVICE) * 3 + 2
    mask = _random_mask(4, 30, "holes")
    out = fastppo.masked_whiten(x, mask, shift_mean=shift_mean)
    torch.testing.assert_close(out, ref.masked_whiten(x, mask, shift_mean=shift_mean))
    vals = out[mask].double()
    xm = x[mask].double()
    mean = 0.0 if shift_mean else xm.mean().item()
    assert abs(vals.mean().item() - mean) < 1e-5
    assert abs(vals.var(unbiased=True).item() - 1.0) < 1e-4
    assert (out[~mask] == 0).all()
    with pytest.raises(ValueError, match="at least 2"):
        fastppo.masked_whiten(x, torch.zeros_like(mask))


@pytest.mark.parametrize("kind,norm", [("grpo", True), ("grpo", False), ("rloo", True)])
@pytest.mark.parametrize("G", [1, 2, 5])
def test_group_advantages(kind, norm, G):
    scores = torch.randn(4 * G, device=DEVICE)
    scores[:G] = 1.0                     # a group with zero spread
    out = fastppo.group_advantages(scores, G, kind=kind, norm_by_std=norm)
    torch.testing.assert_close(out, ref.group_advantages(scores, G, kind=kind, norm_by_std=norm))
    if G > 1:
        torch.testing.assert_close(out.view(-1, G).sum(-1), torch.zeros(4, device=DEVICE), atol=1e-5, rtol=0)
    assert (out[:G] == 0).all()


def test_group_advantages_bad_arguments():
    with pytest.raises(ValueError, match="multiple of group_size"):
        fastppo.group_advantages(torch.randn(7), 2)
    with pytest.raises(ValueError, match="kind"):
        fastppo.group_advantages(torch.randn(8), 2, kind="ppo")
    with pytest.raises(ValueError, match="group_size"):
        fastppo.group_advantages(torch.randn(8), 0)


@pytest.mark.parametrize("kind", ["holes", "right", "left"])
def test_kl_shaped_rewards(kind):
    mask = _random_mask(5, 17, kind)
    mask[0] = False
    scores, kl = torch.randn(5, device=DEVICE), torch.randn(5, 17, device=DEVICE)
    out = fastppo.kl_shaped_rewards(scores, kl, mask, kl_coef=0.05)
    torch.testing.assert_close(out, ref.kl_shaped_rewards(scores, kl, mask, kl_coef=0.05))
    assert (out[0] == 0).all()


def test_kl_controllers():
    fixed = fastppo.FixedKLController(0.1)
    assert fixed.update(5.0, 100) == 0.1
    ctl = fastppo.AdaptiveKLController(0.2, target=6.0, horizon=10000)
    assert ctl.update(12.0, 1000) == pytest.approx(0.2 * (1 + 0.2 * 0.1))     # error clipped at +0.2
    before = ctl.value
    assert ctl.update(5.4, 500) == pytest.approx(before * (1 - 0.1 * 0.05))
    restored = fastppo.AdaptiveKLController(1.0, 1.0, 1.0)
    restored.load_state_dict(ctl.state_dict())
    assert restored.value == ctl.value
    with pytest.raises(ValueError, match="target"):
        fastppo.AdaptiveKLController(0.1, target=0.0, horizon=10)


# ----------------------------------------------------------------------------- hostile inputs (issue #11)
BACKENDS = ["triton", "torch"]


def _gae_ref64(r, v, m, gamma, lam):
    """The documented loop in float64 (fp64 in, fp64 out)."""
    return ref.gae(r.double(), v.double(), m, gamma=gamma, lam=lam)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gae_nan_inf_at_masked_positions_and_views(backend):
    B, T = 3, 41
    r = torch.randn(T, B, device=DEVICE).t()                     # transposed view
    v = torch.randn(B, 2 * T, device=DEVICE)[:, 1::2]             # offset + stride 2
    mask = _random_mask(B, T, "holes")
    mask[2] = False                                               # an empty row
    rn = torch.where(mask, r, float("nan"))
    vn = torch.where(mask, v, float("inf"))
    with fastppo.use_backend(backend):
        adv, ret = fastppo.gae(rn, vn, mask.to(torch.uint8), gamma=0.93, lam=0.87)
    radv, rret = _gae_ref64(r, v, mask, 0.93, 0.87)
    assert torch.isfinite(adv).all() and torch.isfinite(ret).all()
    _close(adv, radv.float())
    _close(ret, rret.float())
    assert (adv[2] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_gae_nan_in_a_live_position_propagates(backend):
    r, v = torch.randn(2, 9, device=DEVICE), torch.randn(2, 9, device=DEVICE)
    mask = torch.ones(2, 9, dtype=torch.bool, device=DEVICE)
    r[0, 5] = float("nan")
    with fastppo.use_backend(backend):
        adv, _ = fastppo.gae(r, v, mask, gamma=0.9, lam=0.9)
    radv, _ = _gae_ref64(r, v, mask, 0.9, 0.9)
    assert torch.equal(torch.isnan(adv), torch.isnan(radv))
    assert torch.isnan(adv[0, :6]).all() and torch.isfinite(adv[0, 6:]).all() and torch.isfinite(adv[1]).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B,T", [(1, 1), (5, 3), (2, 1025), (0, 4)])
def test_gae_fp64_stays_fp64(backend, B, T):
    r, v = torch.randn(B, T, dtype=torch.float64, device=DEVICE), torch.randn(B, T, dtype=torch.float64,
                                                                                device=DEVICE)
    mask = torch.rand(B, T, device=DEVICE) > 0.2
    gamma, lam = 0.999 - 1e-12, 0.95 + 1e-13                     # not representable in fp32
    with fastppo.use_backend(backend):
        adv, ret = fastppo.gae(r, v, mask, gamma=gamma, lam=lam)
    radv, rret = _gae_ref64(r, v, mask, gamma, lam)
    assert adv.dtype == ret.dtype == torch.float64
    torch.testing.assert_close(adv, radv, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ret, rret, rtol=1e-12, atol=1e-12)


def _available_bytes():
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_gae_64bit_offsets(backend):
    """Time stride 2**30 + 1: the element offset t * stride_t passes 2**31 at t = 2 (a 32-bit product wraps;
    it segfaulted before). The views live in storages of ~4 GiB (fp16) and ~2 GiB (bool) of which only the few
    touched pages are resident; skipped where the machine cannot reserve them."""
    if DEVICE == "cuda":
        pytest.skip("needs ~10 GiB of device memory for the sparse views")
    stride = 2**30 + 1
    T = 3
    n = (T - 1) * stride + 2
    try:
        r_store = torch.empty(n, dtype=torch.float16, device=DEVICE)
        v_store = torch.empty(n, dtype=torch.float16, device=DEVICE)
        m_store = torch.empty(n, dtype=torch.bool, device=DEVICE)
    except RuntimeError as e:          # virtual memory refused (overcommit limits)
        pytest.skip(f"cannot reserve 2 x {2 * n / 2**30:.1f} GiB + {n / 2**30:.1f} GiB of virtual memory: {e}")
    shape, strides = (2, T), (1, stride)
    r = r_store.as_strided(shape, strides)
    v = v_store.as_strided(shape, strides)
    m = m_store.as_strided(shape, strides)
    r.copy_(torch.tensor([[1.0, -2.0, 0.5], [0.25, 3.0, -1.0]]))
    v.copy_(torch.tensor([[0.5, 0.125, -0.75], [2.0, -1.5, 1.0]]))
    m.copy_(torch.tensor([[True, False, True], [True, True, True]]))
    with fastppo.use_backend(backend):
        adv, ret = fastppo.gae(r, v, m, gamma=0.9, lam=0.8)
    radv, rret = _gae_ref64(r.contiguous(), v.contiguous(), m.contiguous(), 0.9, 0.8)
    _close(adv, radv.float())
    _close(ret, rret.float())


def test_gae_mask_must_be_binary():
    r = torch.randn(2, 5)
    with pytest.raises(ValueError, match="only 0 and 1"):
        fastppo.gae(r, r, torch.full((2, 5), 0.5))
    with pytest.raises(TypeError, match="gamma"):
        fastppo.gae(r, r, r > 0, gamma=True)


@pytest.mark.parametrize("magnitude,dtype", [(1e20, torch.float32), (1e-20, torch.float32), (1e20, torch.float64),
                                             (1e-20, torch.float64), (1e150, torch.float64)])
def test_masked_whiten_is_scale_safe(magnitude, dtype):
    x = (torch.randn(3, 20, dtype=torch.float64, device=DEVICE) * magnitude).to(dtype)
    mask = _random_mask(3, 20, "holes")
    x = torch.where(mask, x, torch.tensor(float("nan"), dtype=dtype))   # NaN where masked: ignored
    for shift_mean in (True, False):
        out = fastppo.masked_whiten(x, mask, shift_mean=shift_mean)
        xm = x[mask].double()
        mean, var = xm.mean(), xm.var(unbiased=True)
        want = (xm - mean) / torch.sqrt(var + 1e-8)
        if not shift_mean:
            want = want + mean
        assert out.dtype == dtype
        assert (out[~mask] == 0).all()
        torch.testing.assert_close(out[mask].double(), want, rtol=1e-5 if dtype == torch.float32 else 1e-12,
                                   atol=1e-5 if dtype == torch.float32 and shift_mean else 0.0)


def test_masked_whiten_of_constant_values_is_zero():
    out = fastppo.masked_whiten(torch.full((2, 5), 1e20), torch.ones(2, 5, dtype=torch.bool))
    assert (out == 0).all()


def test_group_advantages_refuses_bool_and_float_group_size():
    with pytest.raises(TypeError, match="group_size"):
        fastppo.group_advantages(torch.randn(4), True)
    with pytest.raises(TypeError, match="group_size"):
        fastppo.group_advantages(torch.randn(4), 2.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_group_advantages_large_scores_and_fp64(dtype):
    scores = (torch.tensor([1.0, 2.0, 4.0, -3.0, 5.0, 5.5], dtype=torch.float64) * 1e20).to(dtype)
    out = fastppo.group_advantages(scores, 3)
    s = scores.double().view(-1, 3)
    want = ((s - s.mean(-1, keepdim=True)) / (s.std(-1, keepdim=True) + 1e-6)).reshape(-1)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), want, rtol=1e-6 if dtype == torch.float32 else 1e-12, atol=0)
