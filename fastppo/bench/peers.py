"""The other libraries the bench runs beside fastppo, on the same inputs: TRL 1.16's Triton
log-prob / entropy kernel and its chunked lm-head log-prob function, Liger-Kernel 0.8.5's Triton GRPO
loss and its fused linear GRPO loss. Installed by the `bench` extra; a peer that is not installed is
reported as missing (`missing(peer)` says why), never skipped silently.

Each runs as it runs on a GPU, except where noted (the notes go into the report):
- TRL's chunked function picks its Triton fold kernels only on CUDA devices; while counting on CPU
  (`as_on_gpu()`) it is made to pick them too, so that the interpreter runs the kernels a GPU runs.
- TRL accumulates the gradient products in fp32 with one `addmm(..., out_dtype=float32)` on CUDA and
  upcasts both operands on CPU; the bench runs the CPU math but counts the CUDA op's bytes and FLOPs.
- Liger's fused linear loss runs with `compiled=False` (torch.compile fuses its few loss-math ops on
  a GPU; their bytes are N-sized, the logits-sized traffic is the same).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata

PEERS = {"trl": "trl", "liger": "liger_kernel"}
NOTES = {
    "trl": "TRL {version}: `trl.kernels.selective_log_softmax_and_entropy` (Triton, one program per row, "
           "masked rows skipped with `row_mask`) and `ChunkedLogProbFunction` (cuBLAS tiles of 4096 tokens x "
           "32768 vocabulary, Triton folds; valid rows gathered first, as TRL's fused forward does, here with "
           "`index_select` of precomputed row indices); its Triton folds run in the interpreter as on CUDA, the "
           "fp32 gradient `addmm` is counted as CUDA's single `out_dtype=float32` op; the distillation row runs "
           "`ChunkedDivergenceFunction` (DistillationTrainer's, valid rows gathered the same way) with the same "
           "folds and counting.",
    "liger": "Liger-Kernel {version}: `triton_grpo_loss` (Triton, logits [B, T+1, V], loss_type='bnpo' = "
             "token-mean, in-place gradient) and `LigerFusedLinearGRPOFunction` (chunks of one sequence, "
             "vocabulary chunks of 4096, gradient formed in the forward pass by autograd, compiled=False); "
             "`LigerFusedLinearJSDFunction` (the distillation row: soft loss only, chunks of 1024 rows, "
             "compiled=False).",
}


def missing(peer: str) -> str | None:
    """None when `peer` can run here, else the reason it cannot."""
    try:
        importlib.import_module(PEERS[peer])
        if peer == "trl":
            importlib.import_module("trl.kernels.logprob_entropy")
    except Exception as e:      # noqa: BLE001 - any import failure makes the peer missing
        return f"{PEERS[peer]} not importable ({type(e).__name__}: {e})"
    return None


def version(peer: str) -> str:
    try:
        return importlib.metadata.version(PEERS[peer].replace("_", "-"))
    except importlib.metadata.PackageNotFoundError:
        return "?"


def note(peer: str) -> str:
    return NOTES[peer].format(version=version(peer))


# --- TRL ---------------------------------------------------------------------------------------

def trl_token_logprobs(inp):
    from trl.kernels import selective_log_softmax_and_entropy

    labels = inp["labels"]
    return selective_log_softmax_and_entropy(inp["logits"], labels.clamp(min=0), 1.0, labels != -100)


def _addmm_fp32_counted_as_cuda(acc, a, b):
    """`acc += a @ b` in fp32; counted as the one CUDA op TRL runs (reads a, b, acc; writes acc)."""
    from torch._subclasses.fake_tensor import is_fake
    from torch.utils._python_dispatch import _disable_current_modes

    from .counters import charge_eager

    with _disable_current_modes():
        if not is_fake(acc):
            acc.addmm_(a.float(), b.float())
    charge_eager("addmm", a.numel() * a.element_size() + b.numel() * b.element_size() + 2 * acc.numel() * 4,
                 2 * a.shape[0] * a.shape[1] * b.shape[1])


def _mm_fp32_counted_as_cuda(a, b, acc):
    """a @ b in fp32 from 16-bit operands, computed on CPU from upcast operands; counted as the one CUDA GEMM with
    an fp32 output that fastppo.head_gemm runs there (reads a, b; writes the result)."""
    import torch
    from torch._subclasses.fake_tensor import is_fake
    from torch.utils._python_dispatch import _disable_current_modes

    from .counters import charge_eager

    out = torch.empty(a.shape[0], b.shape[1], dtype=acc, device=a.device)
    with _disable_current_modes():
        if not is_fake(out):
            torch.mm(a.to(acc), b.to(acc), out=out)
    charge_eager("mm", a.numel() * a.element_size() + b.numel() * b.element_size() + out.numel() * out.element_size(),
                 2 * a.shape[0] * a.shape[1] * b.shape[1])
    return out


@contextlib.contextmanager
def as_on_gpu():
    """While counting on CPU: make the peers and fastppo's head products (fastppo.head_gemm) take the code path
    they take on a CUDA device."""
    from .. import head_gemm

    patches = [(head_gemm, "native", head_gemm.half_pair), (head_gemm, "product", _mm_fp32_counted_as_cuda),
               (head_gemm, "add_product", _addmm_fp32_counted_as_cuda)]
    if missing("trl") is None:
        for m in ("chunked_logprob", "chunked_divergence"):
            mod = importlib.import_module(f"trl.kernels.{m}")
            patches += [(mod, "_use_triton", lambda device: True), (mod, "_addmm_fp32", _addmm_fp32_counted_as_cuda)]
    saved = [(mod, name, getattr(mod, name)) for mod, name, _ in patches]
    for mod, name, value in patches:
        setattr(mod, name, value)
    try:
        yield
    finally:
        for mod, name, value in saved:
            setattr(mod, name, value)


def trl_linear_logprobs(inp):
    """TRL's fused lm-head path: gather the valid rows, ChunkedLogProbFunction, scatter back."""
    from trl.kernels import ChunkedLogProbFunction
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE

    idx = inp["valid_rows"]
    logp, ent, *_ = ChunkedLogProbFunction.apply(
        inp["hidden"].index_select(0, idx), inp["weight"], None, inp["labels"].index_select(0, idx), 1.0,
        _CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0, ("entropy",))
    n = inp["hidden"].shape[0]
    return (logp.new_zeros(n).index_copy(0, idx, logp), ent.new_zeros(n).index_copy(0, idx, ent))


def trl_linear_divergence(inp, beta):
    """TRL 1.16's DistillationTrainer loss: ChunkedDivergenceFunction on the valid rows, summed over the tokens
    and divided by their count."""
    from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

    idx = inp["valid_rows"]
    div, _ = ChunkedDivergenceFunction.apply(inp["hidden"].index_select(0, idx), inp["weight"], None,
                                             inp["teacher_hidden"].index_select(0, idx), inp["teacher_weight"], None,
                                             beta)
    return (div.sum() / idx.numel(),)


def trl_linear_ppo_loss(inp, kw):
    """TRL 1.16 GRPOTrainer's loss as it runs with its fused head (loss_type="bnpo": the token mean over the
    completion; beta = kl_coef with the k3 KL, use_bias_correction_kl=False): ChunkedLogProbFunction on the
    completion rows (gathered), then TRL's per-token clipped surrogate and KL in eager PyTorch."""
    import torch
    from trl.kernels import ChunkedLogProbFunction
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE

    idx = inp["loss_rows"]
    h = inp["hidden"].reshape(-1, inp["hidden"].shape[-1]).index_select(0, idx)
    logp, *_ = ChunkedLogProbFunction.apply(h, inp["weight"], None, inp["labels"].reshape(-1).index_select(0, idx),
                                            1.0, _CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0, ())
    old, adv, ref = (inp[k].reshape(-1).index_select(0, idx) for k in ("old", "adv", "ref"))
    ratio = torch.exp(logp - old)
    loss = -torch.min(ratio * adv, torch.clamp(ratio, 1 - kw["clip_low"], 1 + kw["clip_high"]) * adv)
    d = ref - logp
    loss = loss + kw["kl_coef"] * (torch.exp(d) - d - 1)
    return (loss.sum() / idx.numel(),)


# --- Liger-Kernel ------------------------------------------------------------------------------

def liger_ppo_loss(inp, kw):
    from liger_kernel.transformers.grpo_loss import triton_grpo_loss

    loss, _ = triton_grpo_loss(inp["liger_logits"], inp["old"], inp["ref"], inp["labels"], inp["adv_seq"],
                               inp["mask_int"], temperature=1.0, beta=kw["kl_coef"], eps_low=kw["clip_low"],
                               eps_high=kw["clip_high"], loss_type="bnpo", reduce=True)
    return (loss,)


def liger_linear_ppo_loss(inp, kw):
    from liger_kernel.chunked_loss.grpo_loss import LigerFusedLinearGRPOFunction

    loss, _ = LigerFusedLinearGRPOFunction.apply(
        inp["hidden"], inp["weight"], inp["labels"], inp["mask_int"], inp["adv_seq"], None, inp["ref"], inp["old"],
        None, None, None, kw["kl_coef"], kw["clip_low"], kw["clip_high"], "bnpo", None, "token", 1.0, 1.05, 1.0,
        False, True, 1)
    return (loss,)


def liger_linear_jsd(inp, beta):
    """Liger's fused linear generalised JSD (soft loss only: weight_hard_loss 0), its own chunks of 1024 rows,
    compiled=False; masked rows by ignore_index labels."""
    from liger_kernel.chunked_loss.jsd_loss import LigerFusedLinearJSDFunction

    loss = LigerFusedLinearJSDFunction.apply(inp["hidden"], inp["weight"], inp["teacher_hidden"], inp["teacher_weight"],
                                             inp["labels"], None, None, 0.0, 1.0, beta, -100, 1.0, False)
    return (loss,)
