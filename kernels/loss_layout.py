"""Named ids and buffer layouts of the loss-aggregation kernels (kernels/loss_seq.py, kernels/loss_agg.py).

The string -> id tables are fastppo.modes' (AGG_IDS, KL_KIND_IDS, POLICY_LOSS_IDS); the kernels compare
their constexpr arguments with the named `tl.constexpr` ids below, never with bare numbers, and address
the small [rows, NCOL] buffers that travel between the launches by named column.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton.language as tl

from ..modes import AGG_IDS, POLICY_LOSS_IDS

# policy-loss variants (POLICY constexpr of _policy_terms_kernel)
POLICY_PPO = tl.constexpr(POLICY_LOSS_IDS["ppo"])
POLICY_GSPO = tl.constexpr(POLICY_LOSS_IDS["gspo"])
POLICY_GSPO_TOKEN = tl.constexpr(POLICY_LOSS_IDS["gspo_token"])
POLICY_CISPO = tl.constexpr(POLICY_LOSS_IDS["cispo"])
POLICY_SAPO = tl.constexpr(POLICY_LOSS_IDS["sapo"])
POLICY_GMPO = tl.constexpr(POLICY_LOSS_IDS["gmpo"])
POLICY_GPG = tl.constexpr(POLICY_LOSS_IDS["gpg"])
POLICY_DPPO_TV = tl.constexpr(POLICY_LOSS_IDS["dppo_tv"])
POLICY_DPPO_KL = tl.constexpr(POLICY_LOSS_IDS["dppo_kl"])
POLICY_DRO = tl.constexpr(POLICY_LOSS_IDS["dro"])
POLICY_CLIP_COV = tl.constexpr(POLICY_LOSS_IDS["clip_cov"])
POLICY_KL_COV = tl.constexpr(POLICY_LOSS_IDS["kl_cov"])
POLICY_VESPO = tl.constexpr(POLICY_LOSS_IDS["vespo"])   # gpg's terms; its weight phi travels as the IS weight

# aggregation modes (AGG constexpr of _seq_finish_kernel)
AGG_TOKEN_MEAN = tl.constexpr(AGG_IDS["token-mean"])
AGG_SEQ_MEAN_TOKEN_MEAN = tl.constexpr(AGG_IDS["seq-mean-token-mean"])
AGG_SEQ_MEAN_TOKEN_SUM = tl.constexpr(AGG_IDS["seq-mean-token-sum"])
AGG_SEQ_MEAN_TOKEN_SUM_NORM = tl.constexpr(AGG_IDS["seq-mean-token-sum-norm"])

# what the per-sequence pre-pass sums (SEQ constexpr of launches 1 and 2)
SEQ_COUNTS = tl.constexpr(0)       # token counts only
SEQ_GSPO = tl.constexpr(1)         # + sum of d = logp - old (gspo, gspo_token)
SEQ_GMPO = tl.constexpr(2)         # + gmpo's clipped log-ratio, advantage and log-IS-weight sums
KL_NONE = tl.constexpr(0)          # KL_KIND when there is no reference (fastppo.modes.KL_KIND_IDS: 1..5)


def seq_kind(policy_loss: str) -> int:
    """The SEQ pre-pass a policy-loss variant needs."""
    if policy_loss in ("gspo", "gspo_token"):
        return SEQ_GSPO.value
    return SEQ_GMPO.value if policy_loss == "gmpo" else SEQ_COUNTS.value


# Named layouts of the small buffers that travel between the launches.
SEQ_PART_COLS = ("tokens", "log_ratio_sum", "adv_sum", "log_is_sum")           # launch 1, per (b, tile)
SEQ_COLS = ("tokens", "weight", "log_ratio", "adv_mean", "is_weight")          # launch 2, per sequence
TOTAL_COLS = ("tokens", "seqs")                                                 # launch 2, batch totals
PART_COLS = ("pg_loss", "kl_loss", "entropy_loss", "clipped", "clipped_lower", "approx_kl", "ratio",
             "ratio_max", "entropy", "kl", "kept", "seq_grad")                   # launch 3, per (b, tile)
STATS = ("loss", "pg_loss", "kl_loss", "entropy_loss", "clipfrac", "clipfrac_lower", "approx_kl",
         "ratio_mean", "ratio_max", "entropy", "kl", "entropy_kept_frac", "num_tokens", "num_seqs")
NCOL = 16   # row pitch of every small buffer (>= each layout's length)

# column ids of those layouts, as the kernels use them
SP_TOKENS, SP_LOG_RATIO, SP_ADV, SP_LOG_IS = (tl.constexpr(SEQ_PART_COLS.index(c)) for c in SEQ_PART_COLS)
SQ_TOKENS, SQ_WEIGHT, SQ_LOG_RATIO, SQ_ADV_MEAN, SQ_IS_WEIGHT = (tl.constexpr(SEQ_COLS.index(c)) for c in SEQ_COLS)
TOT_TOKENS, TOT_SEQS = (tl.constexpr(TOTAL_COLS.index(c)) for c in TOTAL_COLS)
(P_PG, P_KL_LOSS, P_ENT_LOSS, P_CLIPPED, P_CLIPPED_LOWER, P_APPROX_KL, P_RATIO, P_RATIO_MAX, P_ENTROPY, P_KL,
 P_KEPT, P_SEQ_GRAD) = (tl.constexpr(PART_COLS.index(c)) for c in PART_COLS)
P_SUMMED = tl.constexpr(PART_COLS.index("seq_grad"))   # columns [0, P_SUMMED) are summed over the partials
(ST_LOSS, ST_PG, ST_KL_LOSS, ST_ENT_LOSS, ST_CLIPFRAC, ST_CLIPFRAC_LOWER, ST_APPROX_KL, ST_RATIO_MEAN, ST_RATIO_MAX,
 ST_ENTROPY, ST_KL, ST_KEPT_FRAC, ST_NUM_TOKENS, ST_NUM_SEQS) = (tl.constexpr(STATS.index(c)) for c in STATS)

RATIO_LOG_MAX = tl.constexpr(10.0)   # gspo / gspo_token clamp the sequence log-ratio from above (verl)


class AggResult(NamedTuple):
    """loss (0-d), stats ([len(STATS)] in STATS order; fastppo.losses.stats_dict names them), coef (dloss/dx
    per token, [B, T]), coef_ent (dloss/dH or None), kl (per-token KL or None). Float32 (float64 for float64
    x)."""

    loss: torch.Tensor
    stats: torch.Tensor
    coef: torch.Tensor
    coef_ent: torch.Tensor | None
    kl: torch.Tensor | None


def bt_strides(x: torch.Tensor, B: int, T: int) -> tuple[int, int]:
    """Strides that address x as [B, T]: x may be [B, T], [T] (B == 1) or per-sequence [B]."""
    if x.dim() == 2:
        return x.stride(0), x.stride(1)
    if x.dim() == 1 and x.shape[0] == T and B == 1:
        return 0, x.stride(0)
    if x.dim() == 1 and x.shape[0] == B:
        return x.stride(0), 0
    raise ValueError(f"cannot address a tensor of shape {tuple(x.shape)} as [B={B}, T={T}]")


def bt_shape(mask: torch.Tensor) -> tuple[int, int]:
    """(B, T) of a [B, T] or [T] mask."""
    return (mask.shape[0], mask.shape[1]) if mask.dim() == 2 else (1, mask.shape[0])


class Grid(NamedTuple):
    """The [B, n_tiles] grid of the loss launches. Padded: B sequences of T tokens, n_tiles = cdiv(T,
    block). Packed (cu, [B + 1] offsets): B sequences in one [T = total] dimension, n_tiles = the tiles of
    an average sequence, cdiv(cdiv(total, B), block), each program (b, j) taking the tiles j, j + n_tiles,
    ... of its sequence: as many programs and bytes per token as padded, no host sync for the longest
    sequence. Per-token outputs are [B, T] (packed: [1, total])."""

    B: int
    T: int
    n_tiles: int
    cu: torch.Tensor | None

    @property
    def packed(self) -> bool:
        return self.cu is not None

    @property
    def out_shape(self) -> tuple[int, int]:
        return (1, self.T) if self.packed else (self.B, self.T)

    def strides(self, x: torch.Tensor) -> tuple[int, int]:
        """(per-sequence, per-position) strides of x: packed [total] -> (0, s), per-sequence [B] -> (s, 0)."""
        if not self.packed:
            return bt_strides(x, self.B, self.T)
        if x.dim() == 1 and x.shape[0] == self.T:
            return 0, x.stride(0)
        if x.dim() == 1 and x.shape[0] == self.B:
            return x.stride(0), 0
        raise ValueError(f"cannot address a tensor of shape {tuple(x.shape)} as packed [total={self.T}] or "
                         f"per sequence [S={self.B}]")


def grid_of(mask: torch.Tensor, cu_seqlens: torch.Tensor | None, block_t: int) -> Grid:
    """The Grid of a [B, T] / [T] mask, or of a packed [total] mask with its cu_seqlens."""
    if cu_seqlens is None:
        B, T = bt_shape(mask)
        return Grid(B, T, -(-max(T, 1) // block_t), None)
    B, T = cu_seqlens.shape[0] - 1, mask.shape[0]
    avg = -(-T // max(B, 1))
    return Grid(B, T, -(-max(avg, 1) // block_t), cu_seqlens)
