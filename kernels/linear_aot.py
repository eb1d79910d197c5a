"""Ahead-of-time compile specs of the linear kernels (kernels/linear.py), for kernels/aot.py."""

import triton.language as tl

from . import _config as cfg
from .linear import _linear_dh_kernel, _linear_dw_kernel, _linear_dz_kernel, _linear_finish_kernel, _linear_fwd_kernel


def aot_specs(AOTSpec, sig):
    specs = []
    tiles = dict(BLOCK_N=cfg.LIN_BLOCK_N, BLOCK_V=cfg.LIN_BLOCK_V, ACC=tl.float32, DOT=tl.bfloat16,
                 PRECISION="tf32", HAS_SOFTCAP=True)
    ptrs16 = dict(h_ptr="*bf16", w_ptr="*bf16", b_ptr="*bf16", labels_ptr="*i64", idx_ptr="*i64",
                  nvalid_ptr="*i64", tau_ptr="*fp32", logit_scale="fp32", softcap="fp32", inv_tau="fp32")
    f32 = "*fp32"
    ce = dict(tiles, BLOCK_K=cfg.LIN_BLOCK_K, HAS_BIAS=True, WITH_ENT=True, WITH_EXTRAS=True, STORE_Z=True,
              HAS_TAU_ROWS=True, ROUND=tl.bfloat16, s_hk=1, s_wk=1)   # the JIT specialises unit strides
    types = dict(ptrs16, z_ptr=f32, part_ptr=f32, zy_ptr=f32)
    specs.append(AOTSpec("linear_fwd[bf16]", _linear_fwd_kernel, sig(_linear_fwd_kernel, types, ce), ce,
                         ("H", "V", "s_hn", "s_wv", "s_zn", "v_split"), True, cfg.LIN_NUM_WARPS,
                         cfg.LIN_NUM_STAGES, tensor_cores=True))
    ce = dict(BLOCK=cfg.LIN_FINISH_BLOCK, WITH_ENT=True, WITH_EXTRAS=True, ACC=tl.float32)
    types = {n: f32 for n in _linear_finish_kernel.arg_names if n.endswith("_ptr")}
    types.update(labels_ptr="*i64", idx_ptr="*i64", nvalid_ptr="*i64", top1_ptr="*i8")
    specs.append(AOTSpec("linear_finish", _linear_finish_kernel, sig(_linear_finish_kernel, types, ce), ce, (),
                         False, cfg.ELEM_NUM_WARPS))
    ce = dict(BLOCK_N=cfg.LIN_BLOCK_N, BLOCK_V=cfg.LIN_BLOCK_V, HAS_ENT=True, HAS_SOFTCAP=True, HAS_DB=True,
              ACC_IN=True, HAS_TAU_ROWS=True, ACC=tl.float32)
    types = {n: f32 for n in _linear_dz_kernel.arg_names if n.endswith("_ptr")}
    types.update(dz_ptr="*bf16", labels_ptr="*i64", idx_ptr="*i64", nvalid_ptr="*i64", logit_scale="fp32",
                 softcap="fp32", inv_tau="fp32")
    specs.append(AOTSpec("linear_dz[bf16]", _linear_dz_kernel, sig(_linear_dz_kernel, types, ce), ce,
                         ("V", "s_zn", "s_dzn"), True, cfg.LIN_NUM_WARPS))
    gemm = dict(BLOCK_N=cfg.LIN_BLOCK_N, BLOCK_V=cfg.LIN_BLOCK_V, BLOCK_H=cfg.LIN_BLOCK_H, ACC=tl.float32,
                DOT=tl.bfloat16, PRECISION="tf32")
    ce = dict(gemm, ACC_IN=True, s_wk=1)
    types = dict(dz_ptr="*bf16", w_ptr="*bf16", idx_ptr="*i64", nvalid_ptr="*i64", dh_in_ptr="*fp32", dh_ptr="*bf16")
    specs.append(AOTSpec("linear_dh[bf16]", _linear_dh_kernel, sig(_linear_dh_kernel, types, ce), ce,
                         ("H", "V", "s_dzn", "s_wv", "s_dn"), True, cfg.LIN_NUM_WARPS, cfg.LIN_NUM_STAGES,
                         tensor_cores=True))
    ce = dict(gemm, ACC_IN=True, IN_PLACE=False, s_hk=1)
    types = dict(dz_ptr="*bf16", h_ptr="*bf16", idx_ptr="*i64", nvalid_ptr="*i64", dw_in_ptr=f32, dw_ptr="*bf16")
    specs.append(AOTSpec("linear_dw[bf16]", _linear_dw_kernel, sig(_linear_dw_kernel, types, ce), ce,
                         ("H", "V", "s_dzn", "s_hn"), True, cfg.LIN_NUM_WARPS, cfg.LIN_NUM_STAGES,
                         tensor_cores=True))
    return specs
