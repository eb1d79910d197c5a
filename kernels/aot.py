"""Ahead-of-time compile of every kernel for real GPUs (sm_80, sm_90) without a GPU.

`aot_kernels()` builds the one list of kernels: a new kernel joins the compile test and
`fastppo bench --aot` by being listed there (`_specs`), with the argument types it is launched with and the
constexpr values of its default configuration. Like the JIT, pointers and the integer arguments
named in `divisible` get the `tt.divisibility = 16` attribute (torch allocations are 16-byte
aligned; real vocabularies and row strides are multiples of 16).
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

import triton
import triton.language as tl

from . import _config as cfg


@dataclass(frozen=True)
class AOTSpec:
    name: str
    fn: object
    signature: dict
    constexprs: dict
    divisible: tuple = ()
    streaming: bool = False          # streams a [N, V] operand: its loads must be 128-bit vectors
    num_warps: int = 4
    num_stages: int = 3
    tensor_cores: bool = False       # its tl.dot must compile to mma.sync (sm_80) / wgmma (sm_90)


def _sig(fn, types: dict, constexprs: dict):
    """Signature in the kernel's argument order; unnamed int args default to i32."""
    names = fn.arg_names
    out = {}
    for n in names:
        if n in constexprs:
            out[n] = "constexpr"
        else:
            out[n] = types.get(n, "i32")
    return out


def _specs():
    from . import (
        divergence,
        full_kl,
        fused_grad,
        gae,
        kept,
        kl,
        linear_aot,
        linear_filter,
        linear_kept,
        linear_kept_gather,
        logprobs,
        loss_agg,
        loss_seq,
        mismatch,
        scale,
        topk_divergence,
    )

    row = dict(BLOCK_V=cfg.ROW_BLOCK_V)
    strides = ("stride_outer", "stride_inner", "V")
    specs = []
    scalars = {n: "fp32" for n in ("pre_hi", "pre_lo", "post_hi", "post_lo")}
    for dt in ("bf16", "fp32"):
        # the plain op (token_logprobs) and the fused loss's variant (row validity from the mask + softcap +
        # per-token temperature)
        for tag, extra in (("", dict(HAS_VALID=False, HAS_CAP=False, HAS_TAU_ROWS=False)),
                           (",valid,cap,tau", dict(HAS_VALID=True, HAS_CAP=True, HAS_TAU_ROWS=True))):
            ce = dict(row, WITH_ENT=True, ACC=tl.float32, **extra)
            specs.append(AOTSpec(
                f"logprobs_fwd[{dt}{tag}]", logprobs._logprobs_fwd_kernel,
                _sig(logprobs._logprobs_fwd_kernel, dict(logits_ptr=f"*{dt}", labels_ptr="*i64", valid_ptr="*i1",
                     tau_ptr="*fp32", logp_ptr="*fp32", stats_ptr="*fp32", ent_ptr="*fp32", **scalars), ce), ce,
                strides, True, cfg.ROW_NUM_WARPS))
            # SKIP_UNIT: fused_ppo_loss's backward when its gradient was formed in forward (kernels/fused_grad.py)
            for skip in (False, True) if tag else (False,):
                ce = dict(row, HAS_ENT=True, HAS_SCALE=True, SKIP_UNIT=skip, ACC=tl.float32, **extra)
                specs.append(AOTSpec(
                    f"logprobs_bwd[{dt}{tag}{',skip_unit' if skip else ''}]", logprobs._logprobs_bwd_kernel,
                    _sig(logprobs._logprobs_bwd_kernel, dict(logits_ptr=f"*{dt}", labels_ptr="*i64",
                         valid_ptr="*i1", tau_ptr="*fp32", stats_ptr="*fp32", ent_ptr="*fp32", c_logp_ptr="*fp32",
                         c_ent_ptr="*fp32", scale_ptr="*fp32", dlogits_ptr=f"*{dt}", **scalars), ce), ce,
                    strides + ("d_stride_outer", "d_stride_inner"), True, cfg.ROW_NUM_WARPS))
    ce = dict(row, HAS_TAU_ROWS=False, ACC=tl.float32)
    kl_types = dict(p_ptr="*bf16", q_ptr="*bf16", tau_ptr="*fp32", kl_ptr="*fp32", stats_p_ptr="*fp32",
                    stats_q_ptr="*fp32", g_ptr="*fp32", dp_ptr="*bf16", tau_hi="fp32", tau_lo="fp32")
    kl_div = ("p_outer_s", "p_inner_s", "q_outer_s", "q_inner_s", "V")
    specs.append(AOTSpec("full_kl_fwd[bf16]", full_kl._full_kl_fwd_kernel,
                         _sig(full_kl._full_kl_fwd_kernel, kl_types, ce), ce, kl_div, True, cfg.ROW_NUM_WARPS))
    specs.append(AOTSpec("full_kl_bwd[bf16]", full_kl._full_kl_bwd_kernel,
                         _sig(full_kl._full_kl_bwd_kernel, kl_types, ce), ce, kl_div, True, cfg.ROW_NUM_WARPS))
    specs.extend(loss_seq.aot_specs(AOTSpec, _sig))
    specs.extend(divergence.aot_specs(AOTSpec, _sig))
    specs.extend(topk_divergence.aot_specs(AOTSpec, _sig))
    specs.extend(mismatch.aot_specs(AOTSpec, _sig))
    specs.extend(loss_agg.aot_specs(AOTSpec, _sig))
    ce = dict(KIND=5, BLOCK=cfg.ELEM_BLOCK, ACC=tl.float32)
    specs.append(AOTSpec("kl_fwd", kl._kl_fwd_kernel,
                         _sig(kl._kl_fwd_kernel, dict(logp_ptr="*fp32", ref_ptr="*fp32", kl_ptr="*fp32",
                                                      dkl_ptr="*fp32"), ce), ce, ("n",), True,
                         cfg.ELEM_NUM_WARPS))
    specs.extend(gae.aot_specs(AOTSpec, _sig))
    specs.extend(linear_aot.aot_specs(AOTSpec, _sig))
    specs.extend(linear_filter.aot_specs(AOTSpec, _sig))
    specs.extend(scale.aot_specs(AOTSpec, _sig))
    specs.extend(kept.aot_specs(AOTSpec, _sig))
    specs.extend(linear_kept.aot_specs(AOTSpec, _sig))
    specs.extend(linear_kept_gather.aot_specs(AOTSpec, _sig))
    specs.extend(fused_grad.aot_specs(AOTSpec, _sig))
    return specs


def aot_kernels():
    """The list of AOTSpec (built lazily: kernels import triton.language)."""
    return _specs()


def compile_spec(spec: AOTSpec, cc: int):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = spec.fn.arg_names
    attrs = {}
    for i, n in enumerate(names):
        ty = spec.signature[n]
        if ty.startswith("*") or n in spec.divisible:
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=spec.fn, signature=spec.signature, constexprs=spec.constexprs, attrs=attrs)
    opts = {"num_warps": spec.num_warps, "num_stages": spec.num_stages}
    return triton.compile(src, target=GPUTarget("cuda", cc, 32), options=opts)


def cuobjdump_path() -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def resource_usage(compiled) -> dict:
    """REG, STACK, LOCAL, SHARED of the compiled cubin, read by the cuobjdump inside triton."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(compiled.asm["cubin"])
        path = f.name
    try:
        text = subprocess.run([cuobjdump_path(), "--dump-resource-usage", path], capture_output=True,
                              text=True, check=True).stdout
    finally:
        os.unlink(path)
    found = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", text))
    return {k: int(v) for k, v in found.items()}


def global_loads(compiled) -> dict:
    """Global loads in the PTX by width: 'v4' counts 128-bit loads (ld.global.v4, and 16-byte
    cp.async copies that feed tensor-core tiles through shared memory), 'v2' 64-bit vector loads,
    'scalar' the rest; 'mma' counts tensor-core instructions (mma.sync on sm_80, wgmma on sm_90)."""
    ptx = compiled.asm["ptx"]
    v4 = len(re.findall(r"ld\.global(?:\.\w+)*\.v4\.", ptx))
    v4 += len(re.findall(r"cp\.async\.c[ag]\.shared\.global[^;]*0x10", ptx))
    v2 = len(re.findall(r"ld\.global(?:\.\w+)*\.v2\.", ptx))
    total = len(re.findall(r"ld\.global", ptx)) + len(re.findall(r"cp\.async\.c[ag]\.shared\.global", ptx))
    mma = len(re.findall(r"\bmma\.sync|wgmma\.mma_async", ptx))
    return {"v4": v4, "v2": v2, "scalar": total - v4 - v2, "mma": mma}


def report(ccs=(80, 90)) -> list[dict]:
    """Compile every listed kernel for each compute capability; one row per (kernel, arch)."""
    import time

    rows = []
    for spec in aot_kernels():
        for cc in ccs:
            start = time.perf_counter()
            compiled = compile_spec(spec, cc)
            rows.append({"kernel": spec.name, "arch": f"sm_{cc}", "streaming": spec.streaming,
                         "tensor_cores": spec.tensor_cores,
                         "num_warps": spec.num_warps, **resource_usage(compiled), **global_loads(compiled),
                         "shared_bytes": compiled.metadata.shared,
                         "compile_s": round(time.perf_counter() - start, 3)})
    return rows


def report_in_subprocess(ccs=(80, 90), timeout=900) -> list[dict]:
    """`report` in a fresh interpreter without TRITON_INTERPRET (under the interpreter @triton.jit
    gives functions that cannot be compiled for a GPU)."""
    import json
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    out = subprocess.run([sys.executable, "-m", "fastppo.kernels.aot", *map(str, ccs)], env=env,
                         capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"ahead-of-time compile failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout)


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(report(tuple(int(c) for c in sys.argv[1:]) or (80, 90))))
