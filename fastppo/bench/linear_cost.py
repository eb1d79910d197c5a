"""Exact per-launch counts of the linear pipeline's kernels (kernels/linear.py, kernels/scale.py), as functions
of a launch's arguments and of the number of valid (compacted) rows: the unique bytes it loads and stores and its
tl.dot FLOPs (whole tiles, as the interpreter counts them). The bench uses them for the large shapes (dry runs on fake
tensors, where the kernels do not run): the fit of small-shape counts cannot follow the pipeline's chunking
(chunks of rows x vocabulary whose number depends on N, H and V). Checked launch by launch against the
interpreter's counts (tests/bench/test_linear_cost.py).

Valid rows are packed first (CompactRows), so a chunk [r0, r0 + n_rows) holds nv = clamp(n_valid - r0, 0, n_rows)
of them, in its first rows. One exception is approximated: the forward kernel stores a row's label logit only
in the vocabulary chunk that holds the label, taken as nv * C / V rows for a chunk of C of the V columns."""

from __future__ import annotations

import contextlib

import torch

_n_valid: list = []   # the valid-row count of the op being counted (a stack)


@contextlib.contextmanager
def valid_rows(n: int | None):
    """Inside the block, launches are modelled with `n` valid rows in the op's compacted order."""
    _n_valid.append(n)
    try:
        yield
    finally:
        _n_valid.pop()


def _size(t) -> int:
    return t.element_size() if isinstance(t, torch.Tensor) else 0


def _cdiv(a, b):
    return -(-a // b)


def _fwd(a, nv):
    C, H, BN, BV, BK = a["V"], a["H"], a["BLOCK_N"], a["BLOCK_V"], a["BLOCK_K"]
    splits = _cdiv(C, a["v_split"])
    acc = _size(a["part_ptr"])
    loads = 8 + nv * (_size(a["idx_ptr"]) + _size(a["labels_ptr"]) + H * _size(a["h_ptr"]))
    if a["HAS_TAU_ROWS"]:
        loads += nv * _size(a["tau_ptr"])
    if nv:
        loads += C * H * _size(a["w_ptr"]) + (C * _size(a["b_ptr"]) if a["HAS_BIAS"] else 0)
    planes = 2 + (1 if a["WITH_ENT"] else 0) + (3 if a["WITH_EXTRAS"] else 0)
    stores = nv * splits * planes * acc + (nv * C * _size(a["z_ptr"]) if a["STORE_Z"] else 0)
    w = a["w_ptr"]
    vocab = w.untyped_storage().nbytes() // max(H * w.element_size(), 1)   # the whole head's rows (C: a slice)
    stores += (nv if vocab <= C else round(nv * C / vocab)) * _size(a["zy_ptr"])
    flops = _cdiv(nv, BN) * _cdiv(C, BV) * 2 * BN * BV * BK * _cdiv(H, BK)
    return loads + stores, flops


def _finish(a, nv):
    splits, acc = a["n_splits"], _size(a["part_ptr"])
    ent, extras = a["WITH_ENT"], a["WITH_EXTRAS"]
    loads = 8 + nv * (_size(a["idx_ptr"]) + _size(a["labels_ptr"]) + _size(a["zy_ptr"]))
    loads += nv * splits * acc * (2 + (1 if ent else 0) + (3 if extras else 0))
    stores = nv * (2 * _size(a["lse_ptr"]) + _size(a["logp_c_ptr"]) + _size(a["logp_ptr"]))
    if ent:
        stores += nv * (_size(a["ent_c_ptr"]) + _size(a["ent_ptr"]))
    if extras:
        stores += nv * (_size(a["sq_ptr"]) + _size(a["mean_ptr"]) + _size(a["top1_ptr"]))
    return loads + stores, 0


def _dz(a, nv):
    C = a["V"]
    loads = 8 + nv * (_size(a["idx_ptr"]) + _size(a["labels_ptr"]) + 2 * _size(a["lse_ptr"])
                      + _size(a["c_logp_ptr"]) + C * _size(a["z_ptr"]))
    if a["HAS_ENT"]:
        loads += nv * (_size(a["ent_ptr"]) + _size(a["c_ent_ptr"]))
    if a["HAS_TAU_ROWS"]:
        loads += nv * _size(a["tau_ptr"])
    stores = nv * C * _size(a["dz_ptr"])
    if a["HAS_DB"]:
        stores += C * _size(a["db_ptr"])
        loads += C * _size(a["db_in_ptr"]) if a["ACC_IN"] else 0
    return loads + stores, 0


def _dh(a, nv):
    C, H, BN, BV, BH = a["V"], a["H"], a["BLOCK_N"], a["BLOCK_V"], a["BLOCK_H"]
    loads = 8 + nv * (_size(a["idx_ptr"]) + C * _size(a["dz_ptr"])) + (C * H * _size(a["w_ptr"]) if nv else 0)
    if a["ACC_IN"]:
        loads += nv * H * _size(a["dh_in_ptr"])
    stores = nv * H * _size(a["dh_ptr"])
    return loads + stores, _cdiv(nv, BN) * _cdiv(H, BH) * _cdiv(C, BV) * 2 * BN * BV * BH


def _dw(a, nv):
    C, H, BN, BV, BH = a["V"], a["H"], a["BLOCK_N"], a["BLOCK_V"], a["BLOCK_H"]
    loads = 8 + nv * (_size(a["idx_ptr"]) + C * _size(a["dz_ptr"]) + H * _size(a["h_ptr"]))
    moves = nv > 0 or not a["IN_PLACE"]
    if a["ACC_IN"] and moves:
        loads += C * H * _size(a["dw_in_ptr"])
    stores = C * H * _size(a["dw_ptr"]) if moves else 0
    return loads + stores, _cdiv(C, BV) * _cdiv(H, BH) * _cdiv(nv, BN) * 2 * BV * BN * BH


def _scale(a, nv):
    return a["n"] * (_size(a["x_ptr"]) + _size(a["out_ptr"])) + _size(a["g_ptr"]), 0


MODELS = {"_scale_kernel": _scale, "_linear_fwd_kernel": _fwd, "_linear_finish_kernel": _finish,
          "_linear_dz_kernel": _dz, "_linear_dh_kernel": _dh, "_linear_dw_kernel": _dw}


def launch_cost(kernel: str, args: dict) -> tuple[int, int] | None:
    """(unique bytes loaded + stored, tl.dot FLOPs) of one launch of `kernel` with its arguments `args` (name ->
    value), inside `valid_rows(n)`; None for a kernel without a model or outside valid_rows."""
    model = MODELS.get(kernel)
    if model is None or not _n_valid or _n_valid[-1] is None:
        return None
    if "r0" not in args:     # a kernel that does not depend on the valid rows (kernels/scale.py)
        return model(args, None)
    nv = min(max(_n_valid[-1] - int(args["r0"]), 0), int(args["n_rows"]))
    return model(args, nv)
