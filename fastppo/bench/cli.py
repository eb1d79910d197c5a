"""`fastppo bench [--ops ...] [--out DIR] [--dtype bf16|fp16|fp32] [--aot]`: fastppo, TRL, Liger-Kernel and the
eager reference side by side (bytes, FLOPs, launches, peak memory, projected and measured time)."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

# --dtype: the short names the help shows, and torch's names
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "bfloat16": "bfloat16", "float16": "float16",
          "float32": "float32"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="fastppo bench", description=__doc__)
    p.add_argument("--ops", nargs="+", default=None, help="ops to report (default: all)")
    p.add_argument("--out", default="bench_out", help="folder for bench.csv, bench.md, bench.png; with --ops, "
                   "an existing bench.csv there is updated: those ops' rows replaced, the others kept (same "
                   "--dtype), bench.md and bench.png written from the merged table")
    p.add_argument("--dtype", default="bf16", choices=list(DTYPES), help="input dtype of the ops (default bf16)")
    p.add_argument("--aot", action="store_true", help="registers, spills, shared memory and vector loads "
                   "per kernel for sm_80 and sm_90 instead")
    args = p.parse_args(argv)
    dtype_name = DTYPES[args.dtype]

    import torch

    cuda = torch.cuda.is_available()
    # the counts need Triton's interpreter, switched on before triton is imported: importing fastppo (which
    # this command did) imports triton, so unless TRITON_INTERPRET=1 was already set they run in a subprocess
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"

    if args.aot:
        from ..kernels.aot import report_in_subprocess

        rows = report_in_subprocess()
        print("| kernel | arch | REG | LOCAL (spill) | 128-bit loads | 64-bit | scalar | tensor-core ops | warps |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['kernel']} | {r['arch']} | {r['REG']} | {r['LOCAL']} | {r['v4']} | {r['v2']} | "
                  f"{r['scalar']} | {r['mma']} | {r['num_warps']} |")
        return 0 if all(r["LOCAL"] == 0 for r in rows) else 1

    from tqdm import tqdm

    from . import report
    from .ops import OPS

    ops = args.ops or list(OPS)
    unknown = [o for o in ops if o not in OPS]
    if unknown:
        p.error(f"unknown ops {unknown}; choose from {list(OPS)}")
    # a partial run updates the table already in --out (checked before measuring anything)
    table = Path(args.out) / "bench.csv"
    kept = report.read_csv(table) if args.ops and table.exists() else None
    if kept is not None:
        try:
            report.check_dtype(kept, dtype_name, table)
        except ValueError as e:
            p.error(str(e))
    dtype = getattr(torch, dtype_name)
    start = time.perf_counter()
    if cuda or not interpreted:
        print("counting bytes and launches in Triton's interpreter (CPU subprocess) ...")
        rows = report.rows_in_subprocess(ops, dtype_name)
    else:
        with tqdm(total=report.runs(ops), desc="measuring in Triton's interpreter", unit="run") as bar:
            rows = report.model_rows(ops, dtype, bar)
    if cuda:
        for r in tqdm([r for r in rows if r["source"] == "derived"], desc="timing on the GPU"):
            report.measure_cuda(r, dtype)
    command = f"fastppo bench --out {args.out} --dtype {args.dtype}" + (f" --ops {' '.join(ops)}" if args.ops else "")
    for r in rows:
        r["command"] = command
    if kept is not None:
        earlier = report.generated_by(Path(args.out) / "bench.md") or f"fastppo bench --out {args.out} (earlier run)"
        rows = report.merge_rows(kept, rows, ops, earlier)
    doc, png = report.write_outputs(rows, Path(args.out), cuda, command)
    print(doc)
    print(f"{'updated' if kept is not None else 'wrote'} {args.out}/bench.csv, bench.md" +
          (f", {png.name}" if png else "") +
          f" in {time.perf_counter() - start:.0f} s. 'derived' rows extrapolate exact interpreter counts;"
          " times are projected from bytes, FLOPs and launches" + ("" if not cuda else " and measured on the GPU"))
    return 0
