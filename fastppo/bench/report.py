"""The `fastppo bench` report: per op and shape, bytes moved (fastppo vs eager vs floor), kernel
launches, peak memory of forward + backward, and the projected H100 / A100 time; on CUDA the
measured time and memory beside them. Large shapes are derived from counts measured at small
shapes in Triton's interpreter (the counts are exactly linear in the shape monomials; the fit is
checked on held-out shapes), and labelled as derived."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from .ops import OPS
from .roofline import GPUS, projected_ms

SIDES = ("fastppo", "eager")


def fit_models(ops, dtype, progress=None):
    """{op: {side: LinearModel}} from interpreter measurements (needs TRITON_INTERPRET=1)."""
    from .harness import LinearModel, count

    models = {}
    for name in ops:
        spec = OPS[name]
        models[name] = {}
        for side in SIDES:
            measured = []
            for shape in spec.measure:
                measured.append((shape, count(spec, shape, side, dtype=dtype, device="cpu")))
                if progress is not None:
                    progress.update(1)
            models[name][side] = LinearModel(spec, measured)
    return models


def model_rows(ops, dtype, progress=None):
    """Rows of counts for the measured and the sweep shapes (the part that needs the interpreter)."""
    models = fit_models(ops, dtype, progress)
    rows = []
    for name in ops:
        spec = OPS[name]
        residual = max(m.max_rel_residual for m in models[name].values())
        if residual > 1e-9:
            raise RuntimeError(f"{name}: counts are not linear in {spec.features.__name__}: residual {residual}")
        for source, shapes in (("measured", spec.measure), ("derived", spec.sweep)):
            for shape in shapes:
                row = {"op": name, "shape": " ".join(f"{k}={v}" for k, v in shape.items()), "source": source,
                       "dtype": str(dtype).replace("torch.", ""), "floor_bytes": spec.floor_bytes(shape, dtype)}
                row.update({f"{side}_flops": spec.flops(shape, side) for side in SIDES})
                for side in SIDES:
                    pred = models[name][side].predict(shape)
                    row.update({f"{side}_{k}": v for k, v in pred.items()})
                rows.append(row)
    return rows


def rows_in_subprocess(ops, dtype_name, timeout=3000):
    """model_rows in a CPU-only interpreter process (used on CUDA machines)."""
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    out = subprocess.run([sys.executable, "-m", "fastppo.bench.report", dtype_name, *ops], env=env,
                         capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-4000:])
    return json.loads(out.stdout)


def add_projections(row):
    for gpu in GPUS:
        for side in SIDES:
            row[f"{side}_{gpu}_projected_ms"] = projected_ms(gpu, row[f"{side}_bytes"], row[f"{side}_flops"],
                                                             row[f"{side}_launches"])
        row[f"{gpu}_projected_speedup"] = row[f"eager_{gpu}_projected_ms"] / row[f"fastppo_{gpu}_projected_ms"]
    row["fastppo_bytes_over_floor"] = row["fastppo_bytes"] / row["floor_bytes"]
    row["fastppo_requested_over_floor"] = row["fastppo_requested_bytes"] / row["floor_bytes"]
    row["eager_bytes_over_fastppo"] = row["eager_bytes"] / row["fastppo_bytes"]
    return row


def measure_cuda(row, dtype):
    """Measured GPU time (ms, forward + backward) and peak memory on each side, at the row's shape."""
    import triton.testing

    from .harness import make_step

    spec = OPS[row["op"]]
    shape = dict(kv.split("=") for kv in row["shape"].split())
    shape = {k: int(v) for k, v in shape.items()}
    for side in SIDES:
        torch.cuda.empty_cache()
        try:
            inputs = spec.make(shape, dtype, "cuda")
            step = make_step(spec, side, inputs)
            step()
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            step()
            torch.cuda.synchronize()
            row[f"{side}_cuda_peak_bytes"] = torch.cuda.max_memory_allocated() - base
            row[f"{side}_cuda_ms"] = triton.testing.do_bench(step, warmup=5, rep=50)
        except torch.OutOfMemoryError:
            row[f"{side}_cuda_ms"] = float("nan")
            row[f"{side}_cuda_peak_bytes"] = -1
        finally:
            inputs = None
            torch.cuda.empty_cache()
    row["device"] = torch.cuda.get_device_name()
    return row


def _mib(x):
    return f"{x / 2**20:,.0f}" if x >= 0 else "OOM"


def markdown(rows, cuda: bool) -> str:
    head = ["op", "shape", "source", "fastppo bytes / floor (requested)", "eager / fastppo bytes",
            "launches fastppo / eager", "peak MiB fastppo / eager", "H100 projected ms fastppo / eager",
            "A100 projected ms fastppo / eager"]
    if cuda:
        head += ["measured ms fastppo / eager", "measured peak MiB fastppo / eager"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["op"], r["shape"], r["source"],
                 f"{r['fastppo_bytes_over_floor']:.3f}x ({r['fastppo_requested_over_floor']:.2f}x)",
                 f"{r['eager_bytes_over_fastppo']:.1f}x", f"{r['fastppo_launches']} / {r['eager_launches']}",
                 f"{_mib(r['fastppo_peak_bytes'])} / {_mib(r['eager_peak_bytes'])}"]
        for gpu in GPUS:
            cells.append(f"{r[f'fastppo_{gpu}_projected_ms']:.3f} / {r[f'eager_{gpu}_projected_ms']:.3f} "
                         f"({r[f'{gpu}_projected_speedup']:.1f}x)")
        if cuda:
            if "fastppo_cuda_ms" in r:
                cells.append(f"{r['fastppo_cuda_ms']:.3f} / {r['eager_cuda_ms']:.3f}")
                cells.append(f"{_mib(r['fastppo_cuda_peak_bytes'])} / {_mib(r['eager_cuda_peak_bytes'])}")
            else:
                cells += ["", ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    derived = [r for r in rows if r["source"] != "measured" and r["shape"].startswith("N=") and "H=" not in r["shape"]]
    if not derived:
        return None
    n_max = max(int(r["shape"].split()[0].split("=")[1]) for r in derived)
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    panels = [("bytes", "GB moved, forward + backward", 1e9), ("peak_bytes", "peak GiB, forward + backward", 2**30),
              ("H100_projected_ms", "H100 time, ms (projected)", 1.0)]
    for ax, (key, title, unit) in zip(axes, panels):
        for op in dict.fromkeys(r["op"] for r in derived):
            pts = sorted((int(r["shape"].split()[1].split("=")[1]), r) for r in derived
                         if r["op"] == op and r["shape"].startswith(f"N={n_max} "))
            vs = [v / 1000 for v, _ in pts]
            for side, style in (("fastppo", "-o"), ("eager", "--x")):
                ax.plot(vs, [r[f"{side}_{key}"] / unit for _, r in pts], style, label=f"{op} ({side})")
        ax.set_title(f"{title}, N={n_max}")
        ax.set_xlabel("vocabulary (thousands)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_outputs(rows, out_dir: Path, cuda: bool):
    out_dir.mkdir(parents=True, exist_ok=True)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(out_dir / "bench.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    table = markdown([r for r in rows if r["source"] != "measured"], cuda)
    (out_dir / "bench.md").write_text(table)
    png = plot(rows, out_dir / "bench.png")
    return table, png


if __name__ == "__main__":
    dtype = getattr(torch, sys.argv[1])
    print(json.dumps(model_rows(sys.argv[2:], dtype)))
