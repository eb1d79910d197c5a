"""The chunking of the linear ops' gradient pass (fastppo/linear_pipeline.py: chunk_rows, chunk_shape, the Triton
pipeline): chunks of rows x vocabulary give bitwise the gradients of one chunk; the weight and the fp32 d(weight)
sum are read only for chunks that hold valid rows (counted in the interpreter at 0 / 50 / 75 % prompt); the peak
memory of the linear ops stays below that of TRL's chunked function at the benchmark shapes (dry run)."""

import contextlib

import numpy as np
import pytest
import torch

import fastppo
from fastppo import reference as ref
from fastppo.bench.counters import TritonLaunches
from fastppo.linear_pipeline import chunk_rows, chunk_shape
from tests.helpers import DEVICE, make_labels

pytestmark = pytest.mark.skipif(DEVICE != "cpu", reason="counts kernels in Triton's interpreter")

PROMPTS = (0.0, 0.5, 0.75)


def _inputs(N, H, V, dtype):
    g = torch.Generator().manual_seed(7)
    hidden = torch.randn(N, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) / H**0.5 * 2).to(dtype)
    bias = (torch.randn(V, generator=g) * 0.5).to(dtype)
    return hidden, weight, bias


def _linear_grads(hidden, weight, bias, labels, **kw):
    leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight, bias)]
    g = torch.Generator().manual_seed(3)
    g_logp, g_ent = torch.randn(labels.shape, generator=g), torch.randn(labels.shape, generator=g)
    lp, ent = fastppo.linear_logprobs(leaves[0], leaves[1], labels, bias=leaves[2], return_entropy=True,
                                      temperature=0.9, **kw)
    (lp * g_logp.to(lp.dtype) + ent * g_ent.to(ent.dtype)).sum().backward()
    return lp, ent, [t.grad for t in leaves]


@pytest.mark.parametrize("dtype,chunks", [(torch.float32, (1, 9)), (torch.bfloat16, (2, 9))])
def test_rows_x_vocabulary_chunks_give_the_one_chunk_gradients_bitwise(dtype, chunks):
    """linear_logprobs' backward in chunks of rows x vocabulary columns: d(hidden) carried in fp32 from one
    vocabulary chunk to the next and d(weight) from one row chunk to the next, each starting the accumulator:
    bitwise the log-probs, entropy, d(hidden) and d(weight) of one chunk (d(bias) to fp32 rounding); both match
    the float64 reference."""
    N, H, V = 150, 48, 1031
    hidden, weight, bias = _inputs(N, H, V, dtype)
    labels = make_labels((N,), V, holes=0.2)
    chunk_bytes = 147456          # bf16: 2 chunks of 128 rows x 9 of 128 columns; fp32 (z' only): 1 x 9
    rows, cols = chunk_shape(N, V, H, torch.float32, chunk_bytes, torch.float32 if dtype == torch.float32 else dtype)
    assert (-(-N // rows), -(-V // cols)) == chunks
    with fastppo.use_backend("triton"):
        one = _linear_grads(hidden, weight, bias, labels, chunk_bytes=1 << 30)
        many = _linear_grads(hidden, weight, bias, labels, chunk_bytes=chunk_bytes)
    for a, b in zip((*one[:2], *one[2][:2]), (*many[:2], *many[2][:2])):
        assert torch.equal(a, b)
    torch.testing.assert_close(one[2][2], many[2][2], rtol=1e-5, atol=1e-5)
    want = _linear_grads(hidden.double(), weight.double(), bias.double(), labels)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for got, exp in zip((*many[:2], *many[2]), (*want[:2], *want[2])):
        torch.testing.assert_close(got.double(), exp, **tol)


class _TensorReads:
    """Per Triton launch in the interpreter: (kernel, bytes of `t` loaded (each element once), bytes of `t`
    stored), for a tensor t."""

    def __init__(self, t):
        st = t.untyped_storage()
        self.lo, self.n = st.data_ptr(), st.nbytes()
        self.log: list[tuple[str, int, int]] = []

    @contextlib.contextmanager
    def count(self):
        from triton.runtime.interpreter import GridExecutor, InterpreterBuilder

        orig = (InterpreterBuilder.create_masked_load, InterpreterBuilder.create_masked_store, GridExecutor.__call__)
        cur: dict = {}

        def touch(kind, ptrs, mask):
            if kind in cur:
                size = ptrs.get_element_ty().primitive_bitwidth // 8
                a = np.asarray(ptrs.data, dtype=np.int64)[np.asarray(mask.data, dtype=bool)].ravel() - self.lo
                cur[kind][a[(a >= 0) & (a < self.n)]] = size

        def load(builder, ptrs, mask, other, *args):
            touch("loads", ptrs, mask)
            return orig[0](builder, ptrs, mask, other, *args)

        def store(builder, ptrs, value, mask, *args):
            touch("stores", ptrs, mask)
            return orig[1](builder, ptrs, value, mask, *args)

        def call(executor, *args, **kwargs):
            cur["loads"], cur["stores"] = np.zeros(self.n, np.int64), np.zeros(self.n, np.int64)
            try:
                return orig[2](executor, *args, **kwargs)
            finally:
                self.log.append((executor.fn.__name__, int(cur["loads"].sum()), int(cur["stores"].sum())))
                cur.clear()

        InterpreterBuilder.create_masked_load, InterpreterBuilder.create_masked_store = load, store
        GridExecutor.__call__ = call
        try:
            yield self
        finally:
            (InterpreterBuilder.create_masked_load, InterpreterBuilder.create_masked_store,
             GridExecutor.__call__) = orig

    def total(self, kernel, kind=1):
        return sum(r[kind] for r in self.log if r[0] == kernel)


def _prompt_rows(N, prompt):
    """labels valid after the first `prompt` of each of 4 sequences, and the valid count."""
    valid = torch.ones(4, N // 4, dtype=torch.bool)
    valid[:, : round(prompt * N / 4)] = False
    return valid.reshape(-1), int(valid.sum())


@pytest.mark.parametrize("prompt", PROMPTS)
def test_fused_loss_reads_the_weight_and_the_dweight_sum_only_for_chunks_with_valid_rows(prompt):
    """fused_linear_ppo_loss (gradient formed in forward, chunks of whole rows: 4 chunks of 64 rows here): each
    chunk holding valid rows (the valid rows are packed first) reads the weight twice (its z' product and the
    d(hidden) product) and adds its d(weight) products onto the fp32 sum (read + write 4 V H, written without a
    read by the first chunk); a chunk without valid rows moves none of these bytes (no host sync: the kernels read
    the device count). Bytes of the weight and of d(weight)'s kernel counted in the interpreter."""
    N, H, V = 256, 64, 512
    hidden, weight, _ = _inputs(N, H, V, torch.bfloat16)
    valid, n_valid = _prompt_rows(N, prompt)
    labels = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(1))
    adv = torch.randn(N, generator=torch.Generator().manual_seed(2))
    chunk_bytes = 64 * V * 6                         # 64 rows of fp32 z' + bf16 dz
    assert chunk_rows(N, V, H, torch.float32, chunk_bytes, torch.bfloat16) == 64

    live = [min(max(n_valid - 64 * c, 0), 64) for c in range(N // 64)]
    busy = sum(n > 0 for n in live)
    assert busy == {0.0: 4, 0.5: 2, 0.75: 1}[prompt]
    h_leaf, w_leaf = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    reads, counter = _TensorReads(w_leaf), TritonLaunches()
    with fastppo.use_backend("triton"), reads.count(), counter.count():
        out = fastppo.fused_linear_ppo_loss(h_leaf.view(4, -1, H), w_leaf, labels.view(4, -1),
                                            torch.zeros(4, N // 4) - 5, adv.view(4, -1), valid.view(4, -1),
                                            chunk_bytes=chunk_bytes)
    w_bytes = V * H * 2
    assert reads.total("_linear_fwd_kernel") == busy * w_bytes
    assert reads.total("_linear_dh_kernel") == busy * w_bytes
    # the d(weight) kernel: its fp32 sum (written by chunk 0, read + written by every later chunk with rows),
    # plus each chunk's dz (bf16), hidden rows (bf16), row indices (int64) and the valid count
    sums = 4 * V * H * (1 + 2 * (busy - 1))
    rows_bytes = sum(n * (2 * V + 2 * H + 8) for n in live) + 8 * len(live)
    dw_launches = [r for r in counter.log if r["kernel"] == "_linear_dw_kernel"]
    assert len(dw_launches) == 4
    assert sum(r["loaded_bytes"] + r["stored_bytes"] for r in dw_launches) == sums + rows_bytes
    z = (hidden.double() @ weight.double().t()).view(4, -1, V)
    want = ref.fused_ppo_loss(z, labels.view(4, -1), torch.zeros(4, N // 4) - 5, adv.view(4, -1), valid.view(4, -1))
    torch.testing.assert_close(out.loss.double(), want.loss, rtol=2e-2, atol=2e-3)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_linear_logprobs_reads_the_weight_three_times_and_writes_dweight_once(prompt, monkeypatch):
    """linear_logprobs (statistics from the forward pass; the backward in one row chunk x 4 vocabulary chunks):
    the weight is read once by the forward, once by the backward's z' product and once by the d(hidden)
    product, whatever the prompt fraction and the vocabulary chunking; d(weight) is stored once, in bf16 (2 V H
    bytes), and no fp32 [V, H] sum is read or written; d(hidden) crosses the vocabulary chunks in fp32."""
    from fastppo import linear_pipeline

    N, H, V = 256, 64, 512
    monkeypatch.setattr(linear_pipeline, "MIN_COLS", 128)
    chunk_bytes = N * 128 * 6                         # all 256 rows x 128 columns: 4 vocabulary chunks
    assert chunk_shape(N, V, H, torch.float32, chunk_bytes, torch.bfloat16) == (N, 128)
    hidden, weight, bias = _inputs(N, H, V, torch.bfloat16)
    valid, n_valid = _prompt_rows(N, prompt)
    labels = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(1)).masked_fill(~valid, -100)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight)]
    reads, launches = _TensorReads(leaves[1]), TritonLaunches()
    with fastppo.use_backend("triton"), reads.count(), launches.count():
        lp = fastppo.linear_logprobs(leaves[0], leaves[1], labels, chunk_bytes=chunk_bytes)
        lp.sum().backward()
    w_bytes = V * H * 2
    assert reads.total("_linear_fwd_kernel") == 2 * w_bytes          # the forward and the backward's z'
    assert reads.total("_linear_dh_kernel") == w_bytes
    assert sum(1 for r in reads.log if r[0] == "_linear_dh_kernel") == 4
    dw_launches = [r for r in launches.log if r["kernel"] == "_linear_dw_kernel"]
    assert len(dw_launches) == 4
    # stores: d(weight) in bf16, each element once; loads: dz, hidden rows, row indices, the count (no fp32 sum)
    assert sum(r["stored_bytes"] for r in dw_launches) == 2 * V * H
    assert sum(r["loaded_bytes"] for r in dw_launches) == 4 * (8 + n_valid * 8 + n_valid * H * 2) + n_valid * V * 2


@pytest.mark.parametrize("op", ["linear_logprobs", "fused_linear_ppo_loss"])
def test_peak_below_trl_at_the_benchmark_shape(op):
    """Peak live memory of forward + backward at the benchmark's largest shape (N=8192, H=4096, V=151552, bf16;
    a dry run on fake tensors) at 0 and 75 % prompt: fastppo's linear op stays below TRL's ChunkedLogProbFunction
    (its fp32 d(weight) sum and the cast: 6 V H bytes), and within its own budget (2 V H of chunk buffers)."""
    from fastppo.bench.harness import count
    from fastppo.bench.ops import OPS, side_missing

    if side_missing("trl"):
        pytest.skip(side_missing("trl"))

    shape = {"N": 8192, "H": 4096, "V": 151552}
    for prompt in (0.0, 0.75):
        s = {**shape, "prompt": prompt}
        mine = count(OPS[op], s, "fastppo", dtype=torch.bfloat16, dry_run=True)["peak_bytes"]
        trl = count(OPS[op], s, "trl", dtype=torch.bfloat16, dry_run=True)["peak_bytes"]
        assert mine < trl, (prompt, mine / 2**20, trl / 2**20)
        assert mine <= 6 * shape["V"] * shape["H"] + 8 * shape["N"] * shape["H"], mine / 2**20


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_scale_kernel_rounds_once(dtype):
    """kernels/scale.py (fused_linear_ppo_loss's backward: the upstream gradient times the gradients formed in
    forward): bitwise (x in fp32, or fp64, times g) rounded once to x's dtype, for a non-contiguous x of odd size,
    one read and one write of x."""
    from fastppo.kernels.scale import scale

    g = torch.Generator().manual_seed(5)
    x = (torch.randn(37, 2 * 29, generator=g) * 3).to(dtype)[:, ::2]
    up = torch.tensor(1 / 3, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    launches = TritonLaunches()
    with launches.count():
        got = scale(x, up)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert torch.equal(got, (x.to(acc) * up).to(dtype))
    moved = [r["loaded_bytes"] + r["stored_bytes"] for r in launches.log]
    assert moved == [2 * x.numel() * x.element_size() + up.element_size()]
