"""The `fastppo bench` report: per op, shape and prompt fraction, every side side by side — fastppo,
the peer libraries that offer the op (TRL, Liger-Kernel) and the eager PyTorch reference — with the
same counters: bytes moved (vs the floor), FLOPs, launches, peak memory of forward +
backward, and the projected H100 / A100 time (per launch, charged by its grid: see roofline.py); on
CUDA the measured time and memory beside them.

How each number is obtained (the table's notes repeat it):
- measured rows: everything counted on the real run (Triton kernels in the interpreter, eager ops by
  a dispatch mode);
- derived rows (the large shapes): a dry run on fake tensors gives launches, grid sizes, peak memory,
  host reads and the eager ops' bytes and FLOPs exactly; the Triton kernels' bytes and FLOPs come from
  their exact counts at the measured shapes, which are linear in the shape monomials (fitted per
  kernel, checked on held-out shapes; an error above FIT_TOLERANCE of the side's total count is an
  error), except the linear pipeline's kernels, counted launch by launch by their model
  (bench/linear_cost.py, checked against the interpreter at every measured shape)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from .ops import OPS, side_missing
from .roofline import GPUS, projected_ms, projected_ms_per_launch

SIDES = ("fastppo", "trl", "liger", "eager")
# largest fit error of a kernel's count at the measured shapes, relative to the side's total count there
FIT_TOLERANCE = 1e-4
LABEL = {"fastppo": "fastppo", "trl": "TRL", "liger": "Liger", "eager": "eager"}


def _shape_str(shape):
    return " ".join(f"{k}={v}" for k, v in shape.items() if k != "prompt")


def _prompt(shape):
    return float(shape.get("prompt", 0.0))


def _project(c: dict) -> dict:
    """Projected times of one side's counts, per launch (grid-aware) and with the whole GPU for every
    byte (the model before grid sizes were recorded, kept to show the difference)."""
    out = {}
    for gpu in GPUS:
        kernels = [(k["bytes"], k["flops"], k["programs"] / k["launches"]) for k in c["kernels"].values()]
        out[f"{gpu}_projected_ms"] = projected_ms_per_launch(gpu, kernels, c["eager_roofline_s"][gpu], c["launches"])
        out[f"{gpu}_projected_ms_full_share"] = projected_ms(gpu, c["bytes"], c["flops"], c["launches"])
    progs = [k["programs"] / k["launches"] for k in c["kernels"].values()]
    out["min_programs"] = min(progs) if progs else ""
    return out


_SCALARS = ("host_syncs", "eager_bytes", "eager_flops", "eager_launches", "launches", "peak_bytes")


def _scalars(c: dict) -> dict:
    return {**{k: c[k] for k in _SCALARS}, **{f"eager_roofline_ns_{g}": c["eager_roofline_s"][g] * 1e9 for g in GPUS}}


def _unscalars(p: dict) -> dict:
    return {**{k: p[k] for k in _SCALARS}, "eager_roofline_s": {g: p[f"eager_roofline_ns_{g}"] / 1e9 for g in GPUS}}


def _side_cells(side: str, c: dict) -> dict:
    row = {f"{side}_{k}": c[k] for k in ("bytes", "requested_bytes", "flops", "launches", "peak_bytes")}
    # device values read on the host while running on CPU tensors: includes CPU-only input checks that
    # CUDA skips, so only a hint of a GPU host sync (e.g. Liger's `if grad_output != 1.0`); csv only
    row[f"{side}_host_reads_on_cpu"] = c["host_syncs"]
    row.update({f"{side}_{k}": v for k, v in _project(c).items()})
    row[f"{side}_kernels"] = json.dumps({n: {"launches": k["launches"], "programs": k["programs"]}
                                         for n, k in c["kernels"].items()})
    return row


def op_rows(name, dtype, progress=None):
    """Rows of one op: its measured and sweep shapes, every side (needs TRITON_INTERPRET=1)."""
    from .harness import KERNEL_KEYS, LinearModel, count, with_totals

    spec = OPS[name]
    status = {side: side_missing(side) for side in spec.sides}
    rows = {}
    for source, shapes in (("measured", spec.measure), ("derived", spec.sweep)):
        for shape in shapes:
            rows[(source, tuple(shape.items()))] = {
                "op": name, "shape": _shape_str(shape), "prompt": _prompt(shape), "source": source,
                "dtype": str(dtype).replace("torch.", ""), "floor_bytes": spec.floor_bytes(shape, dtype),
                "floor_flops": spec.floor_flops(shape),
                **{f"{side}_status": ("n/a" if side not in spec.sides else
                                      "ok" if status[side] is None else f"missing: {status[side]}")
                   for side in SIDES}}
    for side in spec.sides:
        if status[side] is not None:
            continue
        for prompt in sorted({_prompt(s) for s in spec.measure}):
            measured = []
            for shape in (s for s in spec.measure if _prompt(s) == prompt):
                c = count(spec, shape, side, dtype=dtype)
                measured.append((shape, c))
                rows[("measured", tuple(shape.items()))].update(_side_cells(side, c))
                if progress is not None:
                    progress.update(1)
            names = list(measured[0][1]["kernels"])
            # kernels with a per-launch model (bench/linear_cost.py) are counted by it at the large shapes; the
            # model must give the interpreter's counts at every measured shape
            modelled = [k for k in names if "model_bytes" in measured[0][1]["kernels"][k]]
            for s, c in measured:
                for k in modelled:
                    got, want = c["kernels"][k], (c["kernels"][k]["bytes"], c["kernels"][k]["flops"])
                    err = max(abs(got["model_bytes"] - want[0]) / max(c["bytes"], 1),
                              abs(got["model_flops"] - want[1]) / max(c["flops"], 1))
                    if err > FIT_TOLERANCE:
                        raise RuntimeError(f"{name}/{side} at {s}: the model of {k} is off by {err:.2e} of the total")
            fit_error = 0.0
            keys = KERNEL_KEYS if spec.derive == "dry_run" else ("launches", "programs", *KERNEL_KEYS)
            models = {k: LinearModel(spec.features, [(s, {key: c["kernels"][k][key] for key in keys})
                                                     for s, c in measured], name=f"{name}/{side}/{k}")
                      for k in names if k not in modelled}
            if spec.derive == "fit":
                models[None] = LinearModel(spec.features, [(s, _scalars(c)) for s, c in measured], name=name)
            for k, m in models.items():
                # a kernel's fit error, relative to the side's total count of the same kind at that shape
                # (launches, programs and the eager scalars: relative to their own value)
                own = [_scalars(c) if k is None else c["kernels"][k] for _, c in measured]
                totals = [[c[key] if key in KERNEL_KEYS else o[key] for key in m.keys]
                          for (_, c), o in zip(measured, own)]
                err = float(np.max(np.abs(m.residuals) / np.maximum(np.abs(np.array(totals, dtype=np.float64)), 1.0)))
                fit_error = max(fit_error, err)
                if err > FIT_TOLERANCE:
                    raise RuntimeError(f"{name}/{side}: counts of {k or 'eager ops'} are not linear in "
                                       f"{spec.features.__name__}: residual {err:.2e} of the total")
            for shape in (s for s in spec.sweep if _prompt(s) == prompt):
                if spec.derive == "dry_run":
                    c = count(spec, shape, side, dtype=dtype, dry_run=True)
                    if set(c["kernels"]) != set(names):
                        raise RuntimeError(f"{name}/{side} at {shape}: kernels {sorted(c['kernels'])}, "
                                           f"measured {names}")
                else:
                    c = _unscalars(models[None].predict(shape))
                    c["kernels"] = {k: {} for k in names}
                for k in (k for k in names if k in models):
                    c["kernels"][k].update(models[k].predict(shape))
                    # the fit extrapolates small shapes (one vocabulary chunk); the unique bytes of a launch
                    # cannot exceed the size of the tensors it was given (recorded by fastppo's launchers)
                    if "io_bytes" in c["kernels"][k]:
                        c["kernels"][k]["bytes"] = min(c["kernels"][k]["bytes"], c["kernels"][k]["io_bytes"])
                row = rows[("derived", tuple(shape.items()))]
                row.update(_side_cells(side, with_totals(c)))
                row[f"{side}_fit_error"] = fit_error
    out = list(rows.values())
    for r in out:
        for side in SIDES:
            if r[f"{side}_status"] == "ok":
                r[f"{side}_bytes_over_floor"] = r[f"{side}_bytes"] / r["floor_bytes"]
                if r["floor_flops"]:
                    r[f"{side}_flops_over_floor"] = r[f"{side}_flops"] / r["floor_flops"]
                for gpu in GPUS:
                    r[f"{side}_{gpu}_time_over_fastppo"] = (r[f"{side}_{gpu}_projected_ms"]
                                                            / r[f"fastppo_{gpu}_projected_ms"])
    return out


def runs(ops) -> int:
    """Interpreter runs model_rows makes (for a progress bar)."""
    return sum(len(OPS[o].measure) * sum(side_missing(s) is None for s in OPS[o].sides) for o in ops)


def model_rows(ops, dtype, progress=None):
    return [r for name in ops for r in op_rows(name, dtype, progress)]


def rows_in_subprocess(ops, dtype_name, timeout=3000):
    """model_rows in a CPU-only interpreter process (used on CUDA machines)."""
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    out = subprocess.run([sys.executable, "-m", "fastppo.bench.report", dtype_name, *ops], env=env,
                         capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-4000:])
    return json.loads(out.stdout)


def measure_cuda(row, dtype):
    """Measured GPU time (ms, forward + backward) and peak memory of each side, at the row's shape."""
    import triton.testing

    from .harness import make_step

    spec = OPS[row["op"]]
    shape = {k: int(v) for k, v in (kv.split("=") for kv in row["shape"].split())}
    shape["prompt"] = row["prompt"]
    for side in spec.sides:
        if row[f"{side}_status"] != "ok":
            continue
        inputs = None
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


def _cell(r, side, cuda):
    st = r[f"{side}_status"]
    if st != "ok":
        return "n/a" if st == "n/a" else "missing"
    eff = (f"{r[f'{side}_flops_over_floor']:.2f}x FLOPs" if r["floor_flops"]
           else f"{r[f'{side}_bytes_over_floor']:.2f}x bytes")
    cell = (f"{r[f'{side}_H100_projected_ms']:.3f} / {r[f'{side}_A100_projected_ms']:.3f} ms, {eff}, "
            f"{r[f'{side}_launches']} launches, {_mib(r[f'{side}_peak_bytes'])} MiB")
    if cuda and f"{side}_cuda_ms" in r:
        cell += f"; measured {r[f'{side}_cuda_ms']:.3f} ms, {_mib(r[f'{side}_cuda_peak_bytes'])} MiB"
    return cell


def _over_floor(r, side) -> str:
    """A side's bytes (FLOPs for the linear ops) over the op's floor, or '' where the side does not run."""
    if r[f"{side}_status"] != "ok":
        return ""
    return f"{r[f'{side}_flops_over_floor' if r['floor_flops'] else f'{side}_bytes_over_floor']:.2f}x"


def summary(rows) -> str:
    """The README table: the largest shape of each op with peers, at 0, 50 and 75 % prompt, H100 projected
    time of each side and its ratio to fastppo's, and each side's bytes (FLOPs for the linear ops) over the
    floor."""
    head = ["op", "shape", "prompt", "fastppo ms", "TRL ms", "Liger ms", "eager ms", "TRL / fastppo",
            "Liger / fastppo", "eager / fastppo", "fastppo / floor", "TRL / floor", "Liger / floor"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for op in dict.fromkeys(r["op"] for r in rows):
        mine = [r for r in rows if r["op"] == op and r["source"] == "derived"]
        if not mine or op == "gae":
            continue
        big = mine[-1]["shape"]
        for prompt in (0.0, 0.5, 0.75):
            r = next((r for r in mine if r["shape"] == big and r["prompt"] == prompt), None)
            if r is None:
                continue
            ms = {s: (f"{r[f'{s}_H100_projected_ms']:.2f}" if r[f"{s}_status"] == "ok" else
                      "n/a" if r[f"{s}_status"] == "n/a" else "missing") for s in SIDES}
            ratio = {s: (f"{r[f'{s}_H100_time_over_fastppo']:.2f}x" if r[f"{s}_status"] == "ok" else "")
                     for s in SIDES}
            lines.append(f"| {op} | {big} | {prompt:.0%} | {ms['fastppo']} | {ms['trl']} | {ms['liger']} | "
                         f"{ms['eager']} | {ratio['trl']} | {ratio['liger']} | {ratio['eager']} | "
                         f"{_over_floor(r, 'fastppo')} | {_over_floor(r, 'trl')} | {_over_floor(r, 'liger')} |")
    return "\n".join(lines) + "\n"


def notes(rows) -> str:
    from . import peers

    lines = ["Notes:",
             "- Times are projections (roofline.py): per Triton launch max(bytes / (BW s), FLOPs / (peak s)) with "
             "s = min(programs, SMs) / SMs (132 SMs on H100, 108 on A100), per eager op max(bytes / BW, FLOPs / "
             "peak), plus 4 us per launch. bf16 inputs, forward + backward.",
             "- bytes: Triton kernels counted in Triton's interpreter (unique addresses loaded + stored per launch, "
             "so rows a kernel skips cost nothing); eager ops: inputs + outputs of every op (TorchDispatchMode). "
             "The floor reads each valid logits row twice and writes its gradient once, and writes a masked "
             "row's zero gradient once; for the linear ops the floor is 6 N_valid H V FLOPs (8 N_valid H V for "
             "linear_divergence: the teacher's logits too).",
             "- derived rows: launches, grid sizes, peak memory and eager bytes / FLOPs from a dry run "
             "at the shape on fake tensors; Triton kernel bytes / FLOPs extrapolated from exact counts at small "
             "shapes (linear in the shape monomials, checked on held-out shapes: the largest error is in the csv, "
             "`<side>_fit_error`, relative to the side's total); fastppo's linear kernels (`_linear_*`) by their "
             "per-launch model instead (fastppo/bench/linear_cost.py: exact at every measured shape), since their "
             "row x vocabulary chunking depends on N, H and V.",
             "- prompt: the first fraction of each of 4 sequences is masked (ignore_index labels for the log-prob "
             "ops, mask 0 for the losses). n/a: the library has no such op. The linear ops at 0 and 50 % only: "
             "75 % needs measured shapes of N >= 1024 rows in the interpreter (whole 64-row tiles of valid rows).",
             "- upstream gradient 0.5 on every output (the scaling paths run), except fused_ppo_loss_one_read: 1, "
             "loss.backward()'s. fused_ppo_loss_one_read is fused_ppo_loss where a row fits its one-read path "
             "(V <= 16384; the gradient formed in forward: 4 bytes per bf16 element of a valid row, 8 when the "
             "upstream gradient is not 1); fused_ppo_loss at V >= 32000 is the two-pass path (6)."]
    for peer in ("trl", "liger"):
        st = {r[f"{peer}_status"] for r in rows} - {"n/a"}
        if st == {"ok"}:
            lines.append(f"- {peers.note(peer)}")
        elif st:
            lines.append(f"- {LABEL[peer]}: {sorted(st)[0]}")
    return "\n".join(lines) + "\n"


def markdown(rows, cuda: bool) -> str:
    head = ["op", "shape", "prompt"] + [f"{LABEL[s]}: H100 / A100 ms, vs floor, launches, peak" for s in SIDES]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["op"], r["shape"], f"{r['prompt']:.0%}"] + [_cell(r, s, cuda) for s in SIDES]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def document(rows, cuda: bool, command: str) -> str:
    """bench.md; `command`: the command line that wrote the rows, unless a row names its own (`command`: the
    rows a partial run replaced in an existing table, see `merge_rows`)."""
    derived = [r for r in rows if r["source"] != "measured"]
    runs: dict = {}
    for r in rows:
        runs.setdefault(r.get("command", command), {})[r["op"]] = None
    first, *later = runs
    by = "".join(f"; the rows of {', '.join(runs[c])} by `{c}`" for c in later)
    return (f"# fastppo bench\n\nGenerated by `{first}`{by}.\n\n"
            "## Summary: fastppo vs TRL vs Liger vs eager (H100, projected)\n\n" + summary(derived) + "\n"
            "## All ops and shapes\n\n" + markdown(derived, cuda) + "\n" + notes(rows))


def plot(rows, path: Path):
    """One panel per (op, metric): bytes moved, peak memory, H100 projected time against the swept
    dimension; one colour and marker per side (hollow, of decreasing size, slightly offset in x, so that
    equal values stay visible), solid with hollow markers at 0 % prompt, dashed with small filled markers
    at 50 %; log axes; legends outside the axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    derived = [r for r in rows if r["source"] == "derived"]
    ops = list(dict.fromkeys(r["op"] for r in derived))
    if not ops:
        return None
    metrics = [("bytes", "GB moved", 1e9), ("peak_bytes", "peak GiB", 2**30),
               ("H100_projected_ms", "H100 ms (projected)", 1.0)]
    # hollow markers of decreasing size and a small horizontal offset per side: equal values stay visible
    style = {"fastppo": ("tab:blue", "o", 10, 0.97), "trl": ("tab:green", "s", 7, 0.99),
             "liger": ("tab:red", "^", 7, 1.01), "eager": ("black", "x", 6, 1.03)}
    fig, axes = plt.subplots(len(ops), len(metrics), figsize=(5.2 * len(metrics) + 2.2, 3.0 * len(ops)),
                             squeeze=False)
    for i, op in enumerate(ops):
        mine = [r for r in derived if r["op"] == op]
        dims = mine[0]["shape"].split()
        # the swept dimension: the one that varies; lines for the largest value of the others
        values = {d.split("=")[0]: sorted({int(r["shape"].split()[j].split("=")[1]) for r in mine})
                  for j, d in enumerate(dims)}
        xdim = max(values, key=lambda d: len(values[d]))
        fixed = {d: v[-1] for d, v in values.items() if d != xdim}
        pts = [r for r in mine if all(f"{d}={v}" in r["shape"].split() for d, v in fixed.items())]
        prompts = sorted({r["prompt"] for r in pts} & {0.0, 0.5})
        for j, (key, title, unit) in enumerate(metrics):
            ax = axes[i][j]
            for side in SIDES:
                for prompt in prompts:
                    sel = sorted((r for r in pts if r["prompt"] == prompt and r[f"{side}_status"] == "ok"),
                                 key=lambda r: int(dict(kv.split("=") for kv in r["shape"].split())[xdim]))
                    if not sel:
                        continue
                    color, marker, size, shift = style[side]
                    xs = [int(dict(kv.split("=") for kv in r["shape"].split())[xdim]) * shift for r in sel]
                    ys = [max(r[f"{side}_{key}"] / unit, 1e-6) for r in sel]
                    full = prompt == 0.0    # 0 %: solid line, hollow marker; 50 %: dashed, small filled marker
                    ax.plot(xs, ys, "-" if full else "--", color=color, marker=marker,
                            markersize=size if full else 0.55 * size, markerfacecolor="none" if full else color,
                            markeredgewidth=1.4, linewidth=1.2, alpha=0.9,
                            label=LABEL[side] + (f", {prompt:.0%} prompt" if len(prompts) > 1 else ""))
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.grid(alpha=0.3, which="both")
            ax.set_title(f"{op}: {title}" + (", " + " ".join(f"{d}={v}" for d, v in fixed.items()) if fixed else ""),
                         fontsize=9)
            ax.set_xlabel(xdim)
        axes[i][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def write_outputs(rows, out_dir: Path, cuda: bool, command: str | None = None):
    """bench.csv, bench.md (saying `command`, default `fastppo bench --out OUT_DIR`, or the rows' own: see
    `document`) and bench.png in out_dir. Rows measured on a GPU (kept by a merge) keep their measured
    cells whatever `cuda` says."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cuda = cuda or any(f"{s}_cuda_ms" in r for r in rows for s in SIDES)
    keys = dict.fromkeys(k for r in rows for k in r)
    if (out_dir / "bench.csv").exists():       # its columns first, in order: an update's diff is its rows
        with open(out_dir / "bench.csv", newline="") as f:
            keys = {**dict.fromkeys(next(csv.reader(f), [])), **keys}
    with open(out_dir / "bench.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    doc = document(rows, cuda, command or f"fastppo bench --out {out_dir}")
    (out_dir / "bench.md").write_text(doc)
    png = plot(rows, out_dir / "bench.png")
    return doc, png


def _cell_value(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def read_csv(path: Path) -> list[dict]:
    """The rows of a bench.csv as `write_outputs` was given them: numbers as numbers, the cells a row did not
    have (written empty) left out."""
    with open(path, newline="") as f:
        return [{k: _cell_value(v) for k, v in r.items() if v != ""} for r in csv.DictReader(f)]


def generated_by(doc_path: Path) -> str | None:
    """The command a bench.md names in its `Generated by` line, or None."""
    if not doc_path.exists():
        return None
    for line in doc_path.read_text().splitlines():
        if line.startswith("Generated by `"):
            return line.split("`")[1]
    return None


def check_dtype(old: list[dict], dtype_name: str, path) -> None:
    """A partial run adds rows of one dtype to a table of one dtype: refuse any other (ValueError)."""
    theirs = sorted({str(r.get("dtype")) for r in old} - {dtype_name})
    if theirs:
        raise ValueError(f"{path} holds rows of dtype {', '.join(theirs)}, this run measures {dtype_name}: "
                         "rerun with the table's --dtype, or write to another --out")


def merge_rows(old: list[dict], new: list[dict], ops, old_command: str | None = None) -> list[dict]:
    """`old` (an existing bench.csv's rows) with every row of `ops` replaced by `new`, the other ops' rows kept as
    they were; ops in the order of OPS (ops OPS no longer has last, in their order). Rows name the command that
    wrote them (`command`, which bench.md quotes); `old_command` for old rows without one."""
    by_op: dict = {}
    kept = [{"command": old_command, **r} if old_command else r for r in old if r["op"] not in ops]
    for r in kept + list(new):
        by_op.setdefault(r["op"], []).append(r)
    order = [o for o in OPS if o in by_op] + [o for o in by_op if o not in OPS]
    return [r for o in order for r in by_op[o]]


if __name__ == "__main__":
    dtype = getattr(torch, sys.argv[1])
    print(json.dumps(model_rows(sys.argv[2:], dtype)))
