import pytest
import torch

import fastppo
from fastppo import reference as ref
from fastppo.bench.counters import PeakMemory, hide_interpreter_copies
from tests.helpers import DEVICE, make_labels, make_mask


def _inputs(N, H, V, dtype, bias=True):
    hidden = torch.randn(N, H, device=DEVICE).to(dtype)
    weight = (torch.randn(V, H, device=DEVICE) / H**0.5 * 2).to(dtype)
    b = (torch.randn(V, device=DEVICE) * 0.5).to(dtype) if bias else None
    return hidden, weight, b


def _grads(fn, tensors, g_logp, g_ent, **kw):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in tensors]
    lp, ent = fn(*leaves[:2], kw.pop("labels"), bias=leaves[2], return_entropy=True, **kw)
    (lp * g_logp.to(lp.dtype) + ent * g_ent.to(ent.dtype)).sum().backward()
    return lp, ent, [t.grad if t is not None else None for t in leaves]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("N,H,V,bias", [(37, 48, 1031, True), (16, 64, 777, False), (5, 19, 130, True)])
def test_matches_materialised_logits(dtype, N, H, V, bias):
    hidden, weight, b = _inputs(N, H, V, dtype, bias)
    labels = make_labels((N,), V)
    g_logp, g_ent = torch.randn(N, device=DEVICE), torch.randn(N, device=DEVICE)
    lp, ent, grads = _grads(fastppo.linear_logprobs, (hidden, weight, b), g_logp, g_ent, labels=labels,
                            temperature=0.9)
    as64 = [t.double() if t is not None else None for t in (hidden, weight, b)]
    rlp, rent, rgrads = _grads(ref.linear_logprobs, as64, g_logp, g_ent, labels=labels, temperature=0.9)
    tol = dict(rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(lp.double(), rlp, **tol)
    torch.testing.assert_close(ent.double(), rent, **tol)
    # gradients are sums over V (d hidden) or N (d weight) of rounded products: dtype tolerance x sqrt(terms)
    for got, want in zip(grads, rgrads):
        if want is None:
            assert got is None
            continue
        assert got.dtype == dtype
        if dtype == torch.float32:
            torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)
        else:
            scale = want.abs().max().item()
            torch.testing.assert_close(got.double(), want, rtol=2e-2, atol=2e-2 * scale)


def test_ignore_index_temperature_and_strided_hidden():
    N, H, V = 20, 32, 300
    base = torch.randn(N, 2 * H, device=DEVICE)
    hidden = base[:, ::2]                           # non-unit last stride
    weight = torch.randn(V, H, device=DEVICE) * 0.2
    labels = make_labels((N,), V, holes=0.3)
    lp, ent = fastppo.linear_logprobs(hidden, weight, labels, temperature=1.3, return_entropy=True)
    rlp, rent = ref.linear_logprobs(hidden.double(), weight.double(), labels, temperature=1.3, return_entropy=True)
    torch.testing.assert_close(lp.double(), rlp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent.double(), rent, rtol=1e-5, atol=1e-5)
    assert (lp[labels == -100] == 0).all()


def test_leading_dims_and_tied_weights():
    B, T, H, V = 2, 7, 16, 100
    emb = torch.nn.Embedding(V, H).to(DEVICE)
    hidden = torch.randn(B, T, H, device=DEVICE, requires_grad=True)
    labels = make_labels((B, T), V)
    lp = fastppo.linear_logprobs(hidden, emb.weight, labels)
    lp.sum().backward()
    assert lp.shape == (B, T) and hidden.grad.shape == hidden.shape and emb.weight.grad.shape == (V, H)


def test_gradcheck_float64():
    hidden, weight, b = _inputs(6, 5, 23, torch.float64)
    labels = make_labels((6,), 23, holes=0.2)
    leaves = [t.requires_grad_() for t in (hidden, weight, b)]

    def f(h, w, bias):
        return fastppo.linear_logprobs(h, w, labels, bias=bias, return_entropy=True)

    assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-6, fast_mode=True)


class LargestAllocation(PeakMemory):
    """PeakMemory that also records the largest single storage allocated inside the block (bytes)."""

    largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = super().__torch_dispatch__(func, types, args, kwargs)
        for _, n in self._live.values():
            self.largest = max(self.largest, n)
        return out


@pytest.mark.parametrize("op", ["linear_logprobs", "fused_linear_ppo_loss"])
def test_no_allocation_near_the_logits(op):
    """Forward + backward with the default (automatic) chunks never allocates a tensor of N*V/8 elements or
    more (chunks of fewer than N/8 rows: 64 of 640 here), and beyond the returned gradients the peak stays
    under the bf16 logits it replaces (per-row buffers included, which dominate at this small V)."""
    N, H, V = 640, 16, 256
    hidden, weight, b = _inputs(N, H, V, torch.bfloat16)
    leaves = [t.requires_grad_() for t in (hidden, weight, b)]
    labels = make_labels((N,), V)
    chunk_bytes = None
    with hide_interpreter_copies(), LargestAllocation() as pm:
        if op == "linear_logprobs":
            lp, ent = fastppo.linear_logprobs(*leaves[:2], labels, bias=leaves[2], return_entropy=True,
                                              chunk_bytes=chunk_bytes)
            loss = lp.sum() + ent.sum()
        else:
            mask = torch.ones(N, dtype=torch.bool)
            loss = fastppo.fused_linear_ppo_loss(*leaves[:2], labels, torch.zeros(N), torch.randn(N), mask,
                                                 bias=leaves[2], entropy_coef=0.1, chunk_bytes=chunk_bytes).loss
        loss.backward()
    returned = sum(t.grad.numel() * t.grad.element_size() for t in leaves)
    assert pm.largest < N * V // 8 * 4, (pm.largest, N * V // 8 * 4)   # bytes of N*V/8 fp32 elements
    assert pm.peak - returned < N * V * 2, (pm.peak - returned, N * V * 2)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-sum-norm", "seq-mean-token-sum", "token-sum"])
def test_fused_linear_ppo_loss_matches_fused_ppo_loss(agg):
    B, T, H, V = 3, 6, 24, 517
    hidden = torch.randn(B, T, H, device=DEVICE)
    weight = torch.randn(V, H, device=DEVICE) * 0.3
    bias = torch.randn(V, device=DEVICE) * 0.1
    labels = make_labels((B, T), V, holes=0.1)
    mask = make_mask((B, T)) & (labels != -100)
    with torch.no_grad():
        lp0 = ref.linear_logprobs(hidden, weight, labels, bias=bias)
    old = lp0 + 0.2 * torch.randn(B, T, device=DEVICE)
    refp = lp0 + 0.1 * torch.randn(B, T, device=DEVICE)
    adv = torch.randn(B, device=DEVICE)
    kw = dict(ref_logprobs=refp, kl_coef=0.1, entropy_coef=0.01, clip_high=0.3, dual_clip=2.0, temperature=0.9,
              agg=agg)

    h1, w1, b1 = (t.clone().requires_grad_() for t in (hidden, weight, bias))
    out = fastppo.fused_linear_ppo_loss(h1, w1, labels, old, adv, mask, bias=b1, **kw)
    (out.loss * 1.5).backward()

    h2, w2, b2 = (t.double().requires_grad_() for t in (hidden, weight, bias))
    logits = h2 @ w2.t() + b2
    rout = ref.fused_ppo_loss(logits, labels, old, adv, mask, **kw)
    (rout.loss * 1.5).backward()
    torch.testing.assert_close(out.loss.double(), rout.loss, rtol=2e-5, atol=2e-5)
    for a, b_ in ((h1, h2), (w1, w2), (b1, b2)):
        torch.testing.assert_close(a.grad.double(), b_.grad, rtol=1e-4, atol=1e-6)
    for k in out.stats:
        torch.testing.assert_close(out.stats[k].double(), rout.stats[k].double(), rtol=1e-4, atol=1e-5)


def test_torch_backend_matches():
    hidden, weight, b = _inputs(12, 16, 200, torch.float32)
    labels = make_labels((12,), 200)
    a = fastppo.linear_logprobs(hidden, weight, labels, bias=b)
    with fastppo.use_backend("torch"):
        c = fastppo.linear_logprobs(hidden, weight, labels, bias=b)
    torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)


def test_bad_arguments():
    hidden, weight, b = _inputs(4, 8, 50, torch.float32)
    labels = make_labels((4,), 50)
    with pytest.raises(ValueError, match="agree on H"):
        fastppo.linear_logprobs(hidden, weight[:, :5], labels)
    with pytest.raises(ValueError, match="bias must be"):
        fastppo.linear_logprobs(hidden, weight, labels, bias=b[:3])
    with pytest.raises(ValueError, match="labels must be in"):
        fastppo.linear_logprobs(hidden, weight, labels + 50)


# ----------------------------------------------------------------------------- Hugging Face
def _tiny_llama(tie):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=211, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=tie)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(DEVICE).eval()


@pytest.mark.parametrize("tie", [False, True])
def test_causal_lm_logprobs_on_tiny_llama(tie):
    from fastppo.hf import causal_lm_logprobs, reference_causal_lm_logprobs

    model = _tiny_llama(tie)
    ids = torch.randint(0, 211, (2, 9), device=DEVICE)
    attn = torch.ones_like(ids)
    attn[1, -3:] = 0                                   # right padding
    lp = causal_lm_logprobs(model, ids, attn)
    want = reference_causal_lm_logprobs(model, ids, attn)
    keep = attn[:, 1:] == 1
    torch.testing.assert_close(lp[keep], want[keep], rtol=1e-4, atol=1e-4)
    assert (lp[~keep] == 0).all()
    lp.sum().backward()
    assert model.get_output_embeddings().weight.grad is not None
    assert model.get_input_embeddings().weight.grad is not None


# ----------------------------------------------------------------------------- round 2: strides, offsets, NaN
def _ref_grads(hidden, weight, bias, labels, g_logp, g_ent, **kw):
    """float64 reference log-probs, entropy and gradients (to hidden, weight, bias) of
    sum(g_logp * logp + g_ent * H)."""
    leaves = [None if t is None else t.detach().double().requires_grad_() for t in (hidden, weight, bias)]
    lp, ent = ref.linear_logprobs(leaves[0], leaves[1], labels, bias=leaves[2], return_entropy=True, **kw)
    (lp * g_logp.double() + ent * g_ent.double()).sum().backward()
    return lp.detach(), ent.detach(), [None if t is None else t.grad for t in leaves]


def test_strided_bias_labels_hidden_and_weight():
    """#11.4: every operand read through its strides on the Triton path (was off by 0.15 / 0.63 for a
    strided bias)."""
    N, H, V = 21, 24, 300
    hidden = torch.randn(H, N, device=DEVICE).t()                     # column-major rows
    weight = (torch.randn(V, 2 * H, device=DEVICE) * 0.3)[:, ::2]     # non-unit last stride
    bias = torch.randn(2 * V, device=DEVICE)[::2]
    labels = make_labels((2 * N,), V, holes=0.2)[::2]
    g_logp, g_ent = torch.randn(N, device=DEVICE), torch.randn(N, device=DEVICE)
    leaves = [t.detach().requires_grad_() for t in (hidden, weight, bias)]
    lp, ent = fastppo.linear_logprobs(leaves[0], leaves[1], labels, bias=leaves[2], return_entropy=True)
    (lp * g_logp + ent * g_ent).sum().backward()
    rlp, rent, rgrads = _ref_grads(hidden, weight, bias, labels, g_logp, g_ent)
    torch.testing.assert_close(lp.double(), rlp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent.double(), rent, rtol=1e-5, atol=1e-5)
    for leaf, want in zip(leaves, rgrads):
        torch.testing.assert_close(leaf.grad.double(), want, rtol=1e-4, atol=1e-5)


def test_offsets_past_2_31():
    """#11.5: a hidden view and a weight view whose element stride is 2^30 + 1 (k * stride passes 2^31, byte
    offsets pass 2^33). The storages are ~6 GiB of virtual memory of which only the viewed elements are
    touched; the test needs 64-bit pointers only, so it runs everywhere (no skip)."""
    S = 2**30 + 1
    N, H, V = 6, 4, 160
    hbase = torch.empty(S * (H - 1) + N, dtype=torch.bfloat16, device=DEVICE)
    hidden = hbase.as_strided((N, H), (1, S))
    hidden.copy_(torch.randn(N, H, device=DEVICE).to(torch.bfloat16))
    wbase = torch.empty(S * (H - 1) + V, dtype=torch.bfloat16, device=DEVICE)
    weight = wbase.as_strided((V, H), (1, S))
    weight.copy_((torch.randn(V, H, device=DEVICE) * 0.5).to(torch.bfloat16))
    labels = make_labels((N,), V, holes=0.2)
    g_logp = torch.randn(N, device=DEVICE)
    h_leaf, w_leaf = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
    lp = fastppo.linear_logprobs(h_leaf, w_leaf, labels)
    (lp * g_logp).sum().backward()
    rlp, _, rgrads = _ref_grads(hidden, weight, None, labels, g_logp, torch.zeros(N, device=DEVICE))
    torch.testing.assert_close(lp.double(), rlp, rtol=1e-5, atol=1e-5)
    for got, want in zip((h_leaf.grad, w_leaf.grad), rgrads):
        torch.testing.assert_close(got.double(), want, rtol=2e-2, atol=2e-2 * want.abs().max().item())
    del hbase, wbase


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_nan_in_masked_or_ignored_rows_never_reaches_a_gradient(backend):
    """#11.3: a NaN hidden row whose mask is 0 (loss) or whose label is ignore_index (log-probs) leaves the
    loss, the per-token outputs of the other rows and every gradient finite and equal to the result
    without that row."""
    B, T, H, V = 2, 5, 16, 257
    hidden = torch.randn(B, T, H, device=DEVICE)
    weight = torch.randn(V, H, device=DEVICE) * 0.3
    bias = torch.randn(V, device=DEVICE) * 0.1
    labels = make_labels((B, T), V, holes=0.0)
    mask = torch.ones(B, T, dtype=torch.bool, device=DEVICE)
    mask[0, 1] = False
    labels[1, 3] = -100
    old, adv = torch.randn(B, T, device=DEVICE) - 5, torch.randn(B, device=DEVICE)
    poisoned = hidden.clone()
    poisoned[0, 1] = float("nan")
    poisoned[1, 3] = float("inf")

    def run(h):
        leaves = [t.clone().requires_grad_() for t in (h, weight, bias)]
        with fastppo.use_backend(backend):
            out = fastppo.fused_linear_ppo_loss(leaves[0], leaves[1], labels, old, adv, mask, bias=leaves[2],
                                                entropy_coef=0.01)
            (out.loss * 0.7).backward()
        return out, [t.grad for t in leaves]

    out, grads = run(poisoned)
    clean_out, clean_grads = run(hidden)
    assert torch.isfinite(out.loss) and all(bool(torch.isfinite(g).all()) for g in grads)
    torch.testing.assert_close(out.loss, clean_out.loss, rtol=1e-6, atol=1e-7)
    for g, c in zip(grads[1:], clean_grads[1:]):
        torch.testing.assert_close(g, c, rtol=1e-6, atol=1e-7)
    assert (grads[0][0, 1] == 0).all() and (grads[0][1, 3] == 0).all()
    keep = mask & (labels != -100)
    assert (out.logprobs[~keep] == 0).all()

    leaves = [t.clone().requires_grad_() for t in (poisoned, weight, bias)]
    lab = labels.clone()
    lab[0, 1] = -100
    with fastppo.use_backend(backend):
        lp = fastppo.linear_logprobs(leaves[0], leaves[1], lab, bias=leaves[2])
    lp.sum().backward()
    assert bool(torch.isfinite(lp).all()) and all(bool(torch.isfinite(t.grad).all()) for t in leaves)


def test_bf16_hidden_with_fp32_bias_gets_an_fp32_accurate_bias_gradient():
    """#11.8: d(bias) sums the fp32 dz (not its bf16 rounding): fp32-level error against float64."""
    N, H, V = 64, 32, 384
    hidden = torch.randn(N, H, device=DEVICE).to(torch.bfloat16)
    weight = (torch.randn(V, H, device=DEVICE) * 0.3).to(torch.bfloat16)
    bias = torch.randn(V, device=DEVICE)
    labels = make_labels((N,), V)
    g_logp, g_ent = torch.randn(N, device=DEVICE), torch.randn(N, device=DEVICE)
    b = bias.clone().requires_grad_()
    lp, ent = fastppo.linear_logprobs(hidden, weight, labels, bias=b, return_entropy=True)
    (lp * g_logp + ent * g_ent).sum().backward()
    _, _, rgrads = _ref_grads(hidden, weight, bias, labels, g_logp, g_ent)
    assert b.grad.dtype == torch.float32
    torch.testing.assert_close(b.grad.double(), rgrads[2], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_no_valid_row(backend):
    N, H, V = 5, 8, 130
    hidden, weight, b = _inputs(N, H, V, torch.float32)
    leaves = [t.requires_grad_() for t in (hidden, weight, b)]
    labels = torch.full((N,), -100, device=DEVICE)
    with fastppo.use_backend(backend):
        lp, ent = fastppo.linear_logprobs(*leaves[:2], labels, bias=leaves[2], return_entropy=True)
    (lp.sum() + ent.sum()).backward()
    assert (lp == 0).all() and (ent == 0).all()
    assert all(bool((t.grad == 0).all()) for t in leaves)


# ----------------------------------------------------------------------------- softcap, logit_scale, extras

# ----------------------------------------------------------------------------- #14.2: FLOPs, launches, chunks
def _half_masked(N, H, V):
    """bf16 inputs whose first half of rows is prompt (mask 0 / ignored label): N_valid = N / 2."""
    hidden, weight, b = _inputs(N, H, V, torch.bfloat16)
    labels = torch.randint(0, V, (N,), device=DEVICE)
    mask = torch.ones(N, dtype=torch.bool, device=DEVICE)
    mask[: N // 2] = False
    return hidden, weight, b, labels, mask


def _count(op, N, H=128, V=1024):
    from fastppo.bench.counters import DotFlops
    from fastppo.kernels.launches import count_launches

    hidden, weight, b, labels, mask = _half_masked(N, H, V)
    leaves = [t.requires_grad_() for t in (hidden, weight, b)]
    flops = DotFlops()
    with flops.count(), count_launches() as launches:
        if op == "linear_logprobs":
            lp, ent = fastppo.linear_logprobs(*leaves[:2], labels.masked_fill(~mask, -100), bias=leaves[2],
                                              return_entropy=True, chunk_bytes=1 << 30)
            loss = (lp * 0.5 + ent * 0.1).sum()
        else:
            loss = fastppo.fused_linear_ppo_loss(*leaves[:2], labels, torch.zeros(N, device=DEVICE),
                                                 torch.randn(N, device=DEVICE), mask, bias=leaves[2],
                                                 entropy_coef=0.1, chunk_bytes=1 << 30).loss
        loss.backward()
    return flops.flops, dict(launches)


@pytest.mark.parametrize("op,bound", [("fused_linear_ppo_loss", 6.1), ("linear_logprobs", 8.1)])
def test_flops_scale_with_valid_rows_and_launches_are_constant_in_n(op, bound):
    """#14.2: tensor-core FLOPs counted tile by tile in the interpreter (whole tiles, masked lanes included):
    the fused loss forms its gradient in forward (6 N_valid H V, prompt rows never projected), linear_logprobs
    recomputes the logits in backward (8 N_valid H V); with a chunk_bytes that holds the batch, the launch
    counts do not depend on N (each further chunk adds the same 5 launches, 6 in the loss)."""
    H, V = 128, 1024
    flops_small, launches_small = _count(op, 128, H, V)
    flops, launches = _count(op, 256, H, V)
    n_valid = 128
    assert flops <= bound * n_valid * H * V, (flops / (n_valid * H * V))
    assert flops >= (bound - 0.2) * n_valid * H * V, (flops / (n_valid * H * V))   # the counter sees the dots
    assert flops_small == flops // 2
    assert launches == launches_small, (launches, launches_small)


def test_fused_loss_chunked_equals_one_chunk_and_recompute_path(monkeypatch):
    """Several chunks (chunk_bytes of one row tile) give the loss and gradients of one chunk and of the
    recompute path (forward, loss, then the gradient pass: the fallback for non-token-local losses), and all
    match the float64 reference."""
    from fastppo import fused_linear as lin_mod

    B, T, H, V = 3, 50, 16, 300
    hidden = torch.randn(B, T, H, device=DEVICE)
    weight = torch.randn(V, H, device=DEVICE) * 0.3
    bias = torch.randn(V, device=DEVICE) * 0.1
    labels = make_labels((B, T), V, holes=0.1)
    mask = make_mask((B, T)) & (labels != -100)
    old = torch.randn(B, T, device=DEVICE) - 5
    adv = torch.randn(B, device=DEVICE)
    refp = old + 0.1 * torch.randn(B, T, device=DEVICE)
    kw = dict(ref_logprobs=refp, kl_coef=0.05, entropy_coef=0.02, agg="seq-mean-token-mean", temperature=0.9,
              final_logit_softcapping=4.0, logit_scale=1.2)

    def run(**extra):
        leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
        out = fastppo.fused_linear_ppo_loss(leaves[0], leaves[1], labels, old, adv, mask, bias=leaves[2], **kw,
                                            **extra)
        (out.loss * 1.3).backward()
        return out, [t.grad for t in leaves]

    one, g_one = run()
    many, g_many = run(chunk_bytes=64 * V * 4)        # 150 rows -> 3 chunks of 64 rows
    monkeypatch.setattr(lin_mod, "_token_local", lambda opts: False)
    rec, g_rec = run()
    monkeypatch.undo()

    h2, w2, b2 = (t.double().requires_grad_() for t in (hidden, weight, bias))
    z = (h2 @ w2.t() + b2) * 1.2
    z = 4.0 * torch.tanh(z / 4.0)
    rkw = {k: v for k, v in kw.items() if k not in ("final_logit_softcapping", "logit_scale")}
    rout = ref.fused_ppo_loss(z, labels, old, adv, mask, **rkw)
    (rout.loss * 1.3).backward()
    for out, grads in ((one, g_one), (many, g_many), (rec, g_rec)):
        torch.testing.assert_close(out.loss.double(), rout.loss, rtol=2e-5, atol=2e-6)
        for got, want in zip(grads, (h2.grad, w2.grad, b2.grad)):
            torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)
        for k in out.stats:
            torch.testing.assert_close(out.stats[k].double(), rout.stats[k].double(), rtol=1e-4, atol=1e-5)


def test_fused_loss_without_grad_and_frozen_head():
    """No gradient work when nothing needs one; a frozen lm_head gets no weight gradient pass."""
    from fastppo.kernels.launches import count_launches

    B, T, H, V = 2, 4, 8, 130
    hidden, weight, _ = _inputs(B * T, H, V, torch.float32, bias=False)
    hidden = hidden.view(B, T, H)
    labels = make_labels((B, T), V)
    mask = make_mask((B, T))
    args = (labels, torch.zeros(B, T), torch.randn(B), mask)
    with count_launches() as plain:
        fastppo.fused_linear_ppo_loss(hidden, weight, *args)
    assert "linear_dh" not in plain and "linear_dw" not in plain
    h = hidden.clone().requires_grad_()
    with count_launches() as frozen:
        fastppo.fused_linear_ppo_loss(h, weight, *args).loss.backward()
    assert frozen["linear_dh"] == 1 and "linear_dw" not in frozen and h.grad is not None


def test_nan_in_a_valid_row_propagates_and_double_backward_raises():
    """NaN in a valid row's hidden gives that row NaN log-prob (as PyTorch) and no other row changes; a
    second differentiation raises a clear RuntimeError instead of a silently wrong number."""
    hidden, weight, b = _inputs(6, 8, 140, torch.float32)
    labels = make_labels((6,), 140, holes=0.0)
    clean = fastppo.linear_logprobs(hidden, weight, labels, bias=b)
    hidden[2, 3] = float("nan")
    lp = fastppo.linear_logprobs(hidden, weight, labels, bias=b)
    assert torch.isnan(lp[2]) and torch.equal(lp[[0, 1, 3, 4, 5]], clean[[0, 1, 3, 4, 5]])
    h = torch.randn(6, 8, requires_grad=True)
    (g,) = torch.autograd.grad(fastppo.linear_logprobs(h, weight, labels).sum(), h, create_graph=True)
    with pytest.raises(RuntimeError, match="cannot differentiate twice"):
        g.sum().backward()
