"""Block sizes and warp counts for every kernel, in one place (every kernel module imports this first).

This folder is installed as `fastppo.kernels` and has no `__init__.py` on purpose: a Python process started
in the repo root has the root on `sys.path`, and a regular package here would shadow Hugging Face's
`kernels` package (which transformers imports). As a namespace portion it never wins over an installed
`kernels`; `fastppo/kernels` is a link to this folder, so the source tree imports it as `fastppo.kernels`.

One fixed configuration per kernel (no autotuning by default). Under the Triton interpreter
(`TRITON_INTERPRET=1`) the same kernels run with blocks sized for test shapes (vocab ~1k).
"""

import os

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Streaming kernels over a vocabulary row: one program per row, BLOCK_V columns per step.
# 4096 fp32 values over 8 warps is 16 per thread: enough bytes in flight, no spills.
ROW_BLOCK_V = 1024 if INTERPRET else 4096
ROW_NUM_WARPS = 8

# fused_ppo_loss with the gradient formed in forward (kernels/fused_grad.py): one program holds a whole row,
# BLOCK_V = next_pow2(V) columns, FUSED_GRAD_COLS_PER_THREAD of them per thread (4 to 32 warps). Rows up to
# FUSED_GRAD_MAX_V columns compile for sm_80 / sm_90 without spills (tests/kernels/test_aot.py); longer rows
# keep the two-pass path.
FUSED_GRAD_MAX_V = 16384
FUSED_GRAD_COLS_PER_THREAD = 16

# Loss aggregation over [B, T] per-token arrays: one program per (sequence, AGG_BLOCK_T tile), then
# one finishing program that reduces the per-tile partials AGG_FINISH_BLOCK rows at a time.
AGG_BLOCK_T = 1024
AGG_NUM_WARPS = 8
AGG_FINISH_BLOCK = 64
AGG_FINISH_BLOCK_J = 16

# GAE: one program per sequence, a reverse scan over BLOCK_T time steps per chunk.
GAE_BLOCK_T = 1024
GAE_NUM_WARPS = 4

# Elementwise per-token kernels.
ELEM_BLOCK = 1024
ELEM_NUM_WARPS = 4

# Fused linear log-probs: tensor-core tiles of hidden [BLOCK_N, BLOCK_K] x weight [BLOCK_V, BLOCK_K].
# The interpreter uses the same tiles, so the bytes it counts are the GPU kernel's (before L2 reuse).
LIN_BLOCK_N = 64
LIN_BLOCK_V = 128
LIN_BLOCK_K = 64
LIN_NUM_WARPS = 8
LIN_NUM_STAGES = 3
# Gradient GEMMs of the linear path: d(hidden) / d(weight) output tiles are [BLOCK_N or BLOCK_V, LIN_BLOCK_H].
LIN_BLOCK_H = 128
# Forward statistics split the vocabulary into ranges of LIN_SPLIT_TILES tiles (one program per row tile and
# range, partials merged by the finish kernel): enough programs for a GPU, several splits at test shapes.
LIN_SPLIT_TILES = 2 if INTERPRET else 16
LIN_FINISH_BLOCK = 256
# Default bound of the linear gradient pass's [rows, V] buffers (fp32 z' + dz) when chunk_bytes=None; the
# automatic chunk also stays under N/8 rows (no allocation of N*V/8 elements or more).
LIN_CHUNK_BYTES = 2 << 30

if INTERPRET:
    from . import _interpreter

    _interpreter.apply()

# Distillation divergences (kernels/divergence.py): one program per row streaming the student's and the
# teacher's rows together, BLOCK_V columns of each per step.
DIV_BLOCK_V = 1024 if INTERPRET else 2048
DIV_NUM_WARPS = 8
# Top-K divergence (kernels/topk_divergence.py): one program per row, BLOCK_V columns per step, each compared
# with the row's K teacher ids; the K bins are one [BLOCK_K] vector (K rounded up to a power of two, at least 16).
TOPK_BLOCK_V = 1024 if INTERPRET else 2048
TOPK_NUM_WARPS = 8
# Mismatch diagnostics (kernels/mismatch.py): one program per sequence over BLOCK_T steps, then one finishing
# program over the per-sequence partials, MISMATCH_FINISH_BLOCK sequences at a time.
MISMATCH_BLOCK_T = 1024
MISMATCH_FINISH_BLOCK = 256
MISMATCH_NUM_WARPS = 4
