"""torch.compile and torch.library: every public op is a registered op (torch.ops.fastppo.*) with a
fake implementation and an autograd formula; compiled functions give one graph with no break and the
eager numbers, on the Triton backend (the interpreter here, CUDA on a GPU) and on the PyTorch backend."""

import functools
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fastppo
from tests.helpers import DEVICE

OPCHECK_TESTS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def _bt(B=2, T=5, requires_grad=False):
    return torch.randn(B, T, device=DEVICE, requires_grad=requires_grad)


def _mask(B=2, T=5):
    mask = torch.rand(B, T, device=DEVICE) > 0.3
    mask[0, 0] = mask[0, 1] = True
    mask[-1] = False   # an empty row
    return mask


def _labels(shape, V):
    labels = torch.randint(0, V, shape, device=DEVICE)
    labels.view(-1)[1] = -100
    return labels


def _logits_cases(backend):
    """token_logprobs, its backward ops and full_kl on a shifted (non-contiguous) view, V = 40."""
    V = 40
    logits = (torch.randn(2, 4, V, device=DEVICE) * 3)[:, :-1].requires_grad_()
    labels = _labels((2, 3), V)
    ref_logits = torch.randn(2, 3, V, device=DEVICE)
    transform = (1 / 0.7, -100, 1.0, None)   # inv_tau, ignore_index, logit_scale, softcap
    fwd = (logits, labels, 1 / 0.7, -100, True, 0.5, 30.0, backend)
    with torch.no_grad():   # saved tensors and upstream gradients, as backward receives them
        logp, ent, lse = torch.ops.fastppo.token_logprobs(logits, labels, 1 / 0.7, -100, True, 1.0, None, backend)
        kl, lse_p, lse_q = torch.ops.fastppo.full_kl(logits, ref_logits, 1 / 0.7, backend)
    g_logp, g_ent = torch.randn_like(logp), torch.randn_like(ent)
    d = logits.detach()
    valid = _mask(2, 3)
    cases = [
        ("token_logprobs", fwd),
        ("token_logprobs", (logits, labels, 1.0, -100, False, 1.0, None, backend)),
        ("token_logprobs", (logits.detach().double().requires_grad_(), labels, 1.0, -100, True, 1.0, None, backend)),
        ("token_logprobs_backward", (d, labels, lse, ent, g_logp, g_ent, None, None, *transform, backend)),
        ("token_logprobs_backward", (d, labels, lse, None, g_logp, None, None, valid, *transform, backend)),
        ("token_logprobs_backward", (d, labels, lse, ent, None, g_ent, None, None, *transform, backend)),  # entropy
        ("full_kl", (logits, ref_logits, 1 / 0.7, backend)),
        ("full_kl_backward", (d, ref_logits, kl, lse_p, lse_q, torch.randn_like(kl), 1 / 0.7, backend)),
    ]
    if backend == "triton":
        scale = torch.tensor(0.5, device=DEVICE)
        cases += [
            ("token_logprobs_backward", (d, labels, lse, ent, g_logp, g_ent, scale, valid, *transform, backend)),
            ("token_logprobs_backward_inplace", (d.contiguous(), labels, lse, ent, g_logp, g_ent, scale, valid,
                                                 *transform)),
        ]
    return cases


def _linear_options(backend, with_entropy=True, extras=False, softcap=None):
    from fastppo.library import encode
    from fastppo.linear import build_linear_options as build

    return encode(build(1 / 0.7, -100, with_entropy, extras, softcap, 1.0, None, backend))


def _linear_kept(labels, V):
    """A per-token temperature and a kept set (CSR ids, offsets) holding every label, for the linear ops."""
    from fastppo import KeptSet

    g = torch.Generator().manual_seed(1)
    mask = torch.rand(labels.numel(), V, generator=g) < 0.4
    live = labels.reshape(-1).cpu() != -100
    mask[live.nonzero()[:, 0], labels.reshape(-1).cpu()[live]] = True
    ks = KeptSet.from_mask(mask).to(DEVICE)
    return torch.rand(labels.shape, generator=g).to(DEVICE) + 0.5, ks.ids, ks.offsets


def _linear_cases(backend):
    V, H = 40, 16
    hidden = torch.randn(2, 3, H, device=DEVICE, requires_grad=True)
    weight = (torch.randn(V, H, device=DEVICE) / 4).requires_grad_()
    bias = torch.randn(V, device=DEVICE, requires_grad=True)
    labels = _labels((2, 3), V)
    opts = _linear_options(backend)
    with torch.no_grad():
        logp, ent, _, _, _, lse, ent_rows, _ = torch.ops.fastppo.linear_logprobs(hidden, weight, bias, labels, opts,
                                                                                 backend)
    h, w, b = hidden.detach(), weight.detach(), bias.detach()
    tau, ids, offsets = _linear_kept(labels, V)
    with torch.no_grad():
        *_, lse_k, ent_k, klse = torch.ops.fastppo.linear_logprobs(hidden, weight, bias, labels, opts, backend, tau,
                                                                   ids, offsets)
    return [
        ("linear_logprobs", (hidden, weight, bias, labels, opts, backend, tau, ids, offsets)),
        ("linear_logprobs_backward", (h, w, b, labels, lse_k, ent_k, torch.randn_like(logp), torch.randn_like(ent),
                                      opts, True, True, True, backend, tau, ids, offsets, klse)),
        ("linear_logprobs", (hidden, weight, bias, labels, opts, backend)),
        ("linear_logprobs", (hidden, weight, None, labels, _linear_options(backend, False, True, 20.0), backend)),
        ("linear_logprobs_backward", (h, w, b, labels, lse, ent_rows, torch.randn_like(logp), torch.randn_like(ent),
                                      opts, True, True, True, backend)),
        ("linear_logprobs_backward", (h, w, None, labels, lse, None, torch.randn_like(logp), None, opts, True, False,
                                      False, backend)),
    ]


def _loss_cases(backend):
    """The loss ops (policy / value aggregation, the fused losses) on one backend."""
    from fastppo.library import encode
    from fastppo.options import LogprobOptions, LossOptions

    V, H = 40, 16
    mask = _mask(2, 3)
    labels = _labels((2, 3), V)
    lp, old, adv, ref = _bt(2, 3, requires_grad=True), _bt(2, 3) - 1, _bt(2, 3), _bt(2, 3) - 1
    ent, isw = _bt(2, 3).abs(), _bt(2, 3).abs()
    cu = torch.tensor([0, 2, 6], device=DEVICE)   # packed: two sequences of 2 and 4 tokens
    logits = torch.randn(2, 3, V, device=DEVICE, requires_grad=True)
    hidden = torch.randn(2, 3, H, device=DEVICE, requires_grad=True)
    weight = (torch.randn(V, H, device=DEVICE) / 4).requires_grad_()
    ppo = encode(LossOptions.policy(clip_low=0.2, clip_high=0.28, dual_clip=3.0, agg="seq-mean-token-mean"))
    gspo = encode(LossOptions.policy(policy_loss="gspo", agg="token-sum", entropy_quantile=0.5, num_tokens=10.0))
    fused = encode(LossOptions.policy(policy_loss="sapo", kl_kind="k3", kl_coef=0.05, entropy_coef=0.01))
    lopts = encode(LogprobOptions(inv_tau=1 / 0.7, ignore_index=-100, with_entropy=True, backend=backend,
                                  logit_scale=0.5, softcap=30.0))
    return [
        ("ppo_policy_loss", (lp, old, adv, mask, None, None, None, ppo, backend)),
        ("ppo_policy_loss", (lp, old, adv[:, 0], mask, ent, isw, None, gspo, backend)),
        ("ppo_policy_loss", (lp.reshape(-1), old.reshape(-1), adv.reshape(-1), mask.reshape(-1), None, None, cu, ppo,
                             backend)),
        ("value_loss", (lp, old, adv, mask, None, encode(LossOptions.value(clip=0.5, agg="seq-mean-token-sum")),
                        backend)),
        ("fused_ppo_loss", (logits, labels, old, adv, mask, ref, isw, None, lopts, fused, backend)),
        ("fused_ppo_loss", (logits, labels, old, adv[:, 0], mask, None, None, None,
                            encode(LogprobOptions(backend=backend)), ppo, backend)),
        ("fused_linear_ppo_loss", (hidden, weight, None, labels, old, adv, mask, ref, None, None, fused,
                                   _linear_options(backend), True, True, False, backend)),
        ("fused_linear_ppo_loss", (hidden, weight, None, labels, old, adv, mask, ref, None, None, fused,
                                   _linear_options(backend), True, True, False, backend, *_linear_kept(labels, V))),
    ]


def _op_cases():
    """(op name, args) for opcheck: every op, every backend it runs, tiny shapes, strided views."""
    r, mask = _bt(), _mask()
    v_t = _bt(5, 2).t()   # a transposed (non-contiguous) view
    lp, ref = _bt(requires_grad=True), _bt()
    cases = [
        ("gae", (r, v_t, mask, 0.9, 0.8, "triton")),
        ("gae", (r, v_t, mask, 0.9, 0.8, "torch")),
        ("masked_whiten", (r, mask, False)),
        ("group_advantages", (_bt(1, 6)[0], 3, "grpo", True, 1e-6)),
        ("group_advantages", (_bt(1, 6)[0], 2, "rloo", True, 1e-6)),
        ("kl_shaped_rewards", (_bt(1, 2)[0], ref, mask, 0.1)),
        ("rollout_is_weights", (r, v_t, mask, "token", "truncate", 2.0, None)),
        ("rollout_is_weights", (r, v_t, mask, "sequence", "mask", 2.0, 0.5)),
    ]
    for backend in ("triton", "torch"):
        cases += [("kl_penalty", (lp, ref, "k3", backend)),
                  ("kl_penalty", (lp.detach().double().requires_grad_(), ref.double(), "low_var_kl", backend))]
        cases += _logits_cases(backend) + _linear_cases(backend) + _loss_cases(backend)
    return cases


OP_NAMES = sorted({name for name, _ in _op_cases()})


@pytest.mark.parametrize("case", range(len(_op_cases())))
def test_opcheck(case):
    torch.manual_seed(case)
    name, args = _op_cases()[case]
    torch.manual_seed(case)
    if DEVICE == "cpu" and "triton" in args and not fastppo.library.OPAQUE_KERNELS:
        pytest.skip("the Triton backend needs CUDA or TRITON_INTERPRET=1")
    result = torch.library.opcheck(getattr(torch.ops.fastppo, name), args, test_utils=OPCHECK_TESTS)
    assert all(v == "SUCCESS" for v in result.values()), result


def test_every_public_op_is_registered_and_checked():
    public = ("token_logprobs", "linear_logprobs", "full_kl", "kl_penalty", "ppo_policy_loss", "value_loss",
              "fused_ppo_loss", "fused_linear_ppo_loss", "gae", "masked_whiten", "group_advantages",
              "kl_shaped_rewards", "rollout_is_weights")
    assert set(public) <= set(OP_NAMES)
    for name in OP_NAMES:
        assert hasattr(torch.ops.fastppo, name), name


def _train_step(logits, hidden, weight, values, labels, old, mask, rewards, scores):
    """A PPO step touching every public op: the rollout-time ops, then the losses."""
    ref = old + 0.1
    adv, ret = fastppo.gae(fastppo.kl_shaped_rewards(scores, fastppo.kl_penalty(old, ref), mask, kl_coef=0.1),
                           values.detach(), mask, gamma=0.9, lam=0.8)
    adv = fastppo.masked_whiten(adv, mask) + fastppo.group_advantages(scores, 2)[:, None]
    isw, _ = fastppo.rollout_is_weights(old, old - 0.05, mask, level="sequence")
    out = fastppo.fused_ppo_loss(logits, labels, old, adv, mask, ref_logprobs=ref, kl_coef=0.05, entropy_coef=0.01,
                                 rollout_is_weights=isw,
                                 dual_clip=3.0, agg="seq-mean-token-mean")
    logp, ent = fastppo.token_logprobs(logits, labels, temperature=0.7, return_entropy=True)
    lin = fastppo.fused_linear_ppo_loss(hidden, weight, labels, old, adv, mask, entropy_coef=0.01)
    lin_logp = fastppo.linear_logprobs(hidden, weight, labels)
    pg, _ = fastppo.ppo_policy_loss(lin_logp, old, adv, mask, clip_high=0.28)
    vf, _ = fastppo.value_loss(values, values.detach() + 0.1, ret, mask, clip=0.2)
    kl_full = fastppo.full_kl(logits, logits.detach() * 0.5)
    extra = torch.where(mask, 0.01 * (logp + ent + kl_full + fastppo.kl_penalty(logp, ref)), 0.0).sum()
    return out.loss + lin.loss + pg + vf + extra + 0.0 * out.stats["clipfrac"]


def _core_step(logits, hidden, weight, values, labels, old, mask, rewards, scores):
    """The issue's function: gae + fused_ppo_loss + token_logprobs + linear_logprobs."""
    adv, _ = fastppo.gae(rewards, values.detach(), mask, gamma=0.9, lam=0.8)
    out = fastppo.fused_ppo_loss(logits, labels, old, adv, mask, entropy_coef=0.01)
    logp, ent = fastppo.token_logprobs(logits, labels, return_entropy=True)
    lin_logp = fastppo.linear_logprobs(hidden, weight, labels)
    return out.loss + torch.where(mask, 0.01 * (logp + ent + lin_logp), 0.0).sum() + 0.0 * values.sum()


STEPS = {"full": _train_step, "core": _core_step}


def _step_inputs(B=2, T=5, V=48, H=16, seed=1):
    torch.manual_seed(seed)
    logits = (torch.randn(B, T, V, device=DEVICE) * 2).requires_grad_()
    hidden = torch.randn(B, T, H, device=DEVICE, requires_grad=True)
    weight = (torch.randn(V, H, device=DEVICE) / 4).requires_grad_()
    values = _bt(B, T, requires_grad=True)
    labels = _labels((B, T), V)
    old = -torch.rand(B, T, device=DEVICE) * 4
    return logits, hidden, weight, values, labels, old, _mask(B, T), _bt(B, T), torch.randn(B, device=DEVICE)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_no_graph_break(backend):
    """gae + fused_ppo_loss + token_logprobs + linear_logprobs (and every other op) in one graph."""
    args = _step_inputs()
    torch._dynamo.reset()
    with fastppo.use_backend(backend):
        explained = torch._dynamo.explain(_train_step)(*args)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


@functools.cache
def _eager_step(step, backend):
    args = _step_inputs()
    with fastppo.use_backend(backend):
        loss = STEPS[step](*args)
        return args, loss.detach(), torch.autograd.grad(loss, args[:4])


# aot_eager on the step that calls every op; Inductor (slow to compile on CPU) on the function.
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("step,compiler", [("full", "aot_eager"), ("core", "inductor")])
def test_compiled_step_matches_eager(backend, step, compiler):
    args, want, want_grads = _eager_step(step, backend)
    params = args[:4]
    with fastppo.use_backend(backend):
        torch._dynamo.reset()
        got = torch.compile(STEPS[step], backend=compiler, fullgraph=True)(*args)
        got_grads = torch.autograd.grad(got, params)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


NO_INTERPRETER = textwrap.dedent("""
    import torch
    import fastppo
    from torch._dynamo.backends.common import aot_autograd
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
    from fastppo.library import encode
    from fastppo.linear import build_linear_options
    from fastppo.options import LogprobOptions, LossOptions

    assert not fastppo.library.OPAQUE_KERNELS
    # the PyTorch backend: the triton_op bodies are the fake implementations
    r, v = torch.randn(3, 6), torch.randn(3, 6)
    mask = torch.rand(3, 6) > 0.3
    logits, labels = torch.randn(3, 6, 40, requires_grad=True), torch.randint(0, 40, (3, 6))
    for op, args in [(torch.ops.fastppo.gae, (r, v, mask, 0.9, 0.8, "torch")),
                     (torch.ops.fastppo.token_logprobs, (logits, labels, 1.0, -100, True, 1.0, None, "torch"))]:
        res = torch.library.opcheck(op, args)
        assert all(x == "SUCCESS" for x in res.values()), res

    # the Triton backend traced, not run (no GPU here): AOTAutograd's joint forward + backward graph
    # holds the kernels themselves (Inductor compiles them into its graph), no opaque fastppo op
    PPO = encode(LossOptions.policy(entropy_coef=0.01))
    LOGITS = encode(LogprobOptions(with_entropy=True, backend="triton"))
    LINEAR = encode(build_linear_options(1.0, -100, False, False, None, 1.0, None, "triton"))
    joint = []
    def partition(gm, inputs, **kwargs):
        joint.append(gm)
        raise RuntimeError("traced")
    def unreachable(gm, example_inputs):
        raise AssertionError("the partitioner stops first")
    def step(logits, labels, hidden, weight, old, adv, mask, r, v):
        gae_adv, ret = torch.ops.fastppo.gae(r, v, mask, 0.9, 0.8, "triton")
        loss = torch.ops.fastppo.fused_ppo_loss(logits, labels, old, adv, mask, None, None, None, LOGITS, PPO,
                                                "triton")[0]
        logp, ent, _ = torch.ops.fastppo.token_logprobs(logits, labels, 1.0, -100, True, 1.0, None, "triton")
        lin = torch.ops.fastppo.linear_logprobs(hidden, weight, None, labels, LINEAR, "triton")[0]
        kl = torch.ops.fastppo.kl_penalty(logp, old, "k3", "triton")[0]
        kl = kl + torch.ops.fastppo.full_kl(logits, logits * 0.5, 1.0, "triton")[0]
        return loss + (logp + ent + lin + kl).sum() + (gae_adv + ret).sum()
    args = (logits, labels, torch.randn(3, 6, 16, requires_grad=True), torch.randn(40, 16, requires_grad=True),
            torch.randn(3, 6), torch.randn(3, 6), mask, r, v)
    try:
        torch.compile(step, backend=aot_autograd(fw_compiler=unreachable, partition_fn=partition),
                      fullgraph=True)(*args)
    except Exception as e:
        assert "traced" in str(e), e
    kernels = set()
    for node in joint[0].graph.nodes:
        if node.target is torch.ops.higher_order.triton_kernel_wrapper_functional:
            kernels.add(kernel_side_table.get_kernel(node.kwargs["kernel_idx"]).fn.__name__)
        assert "fastppo" not in str(node.target), node.target
    want = {"_gae_kernel", "_logprobs_fwd_kernel", "_policy_terms_kernel", "_agg_finish_kernel", "_logprobs_bwd_kernel",
            "_linear_fwd_kernel", "_linear_finish_kernel", "_linear_dz_kernel", "_linear_dh_kernel",
            "_linear_dw_kernel", "_kl_fwd_kernel", "_full_kl_fwd_kernel", "_full_kl_bwd_kernel"}
    assert want <= kernels, (want - kernels, kernels)
    print("OK")
""")


@pytest.mark.skipif(DEVICE != "cpu", reason="checks the CPU registration without the interpreter")
def test_triton_ops_traced_without_interpreter():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.getcwd() + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", NO_INTERPRETER], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stderr[-3000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graph capture needs a GPU")
def test_cuda_graph_replays_compiled_step():
    """The compiled forward + backward is captured in one CUDA graph (capture fails on any host sync)
    and replays new inputs with the eager numbers."""
    static = _step_inputs()
    compiled = torch.compile(_core_step, fullgraph=True)

    def fwd_bwd(args):
        loss = compiled(*args)
        return (loss, *torch.autograd.grad(loss, args[:4]))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):   # compile and warm up outside the capture
            fwd_bwd(static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = fwd_bwd(static)
    for seed in (2, 3):
        fresh = _step_inputs(seed=seed)
        with torch.no_grad():
            for dst, src in zip(static, fresh):
                dst.copy_(src)
        graph.replay()
        want = _core_step(*fresh)
        want_all = (want, *torch.autograd.grad(want, fresh[:4]))
        for got, ref in zip(outs, want_all):
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
