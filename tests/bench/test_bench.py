"""The benchmark counters must be exact, or the numbers they produce mean nothing."""

import dataclasses

import pytest
import torch
import triton
import triton.language as tl

import fastppo
from fastppo.bench import ops as bench_ops
from fastppo.bench import report
from fastppo.bench.counters import EagerTraffic, KernelTraffic, PeakMemory, TritonLaunches, hide_interpreter_copies
from fastppo.bench.harness import LinearModel, count
from fastppo.bench.ops import OPS, logits_floor, n_valid
from fastppo.bench.roofline import projected_ms, projected_ms_per_launch


def test_kernel_traffic_of_logprobs_forward_is_exact():
    from fastppo.kernels.logprobs import logprobs_fwd

    N, V = 5, 1031
    logits = torch.randn(N, V)
    labels = torch.tensor([1, 2, -100, 4, 5])
    traffic = KernelTraffic()
    with traffic.count():
        logprobs_fwd(logits, labels, inv_tau=1.0, ignore_index=-100, with_entropy=False)
    # the 4 non-ignored rows' logits once (the ignored row is never read), labels (int64), their label logit
    assert traffic.loaded == 4 * V * 4 + N * 8 + 4 * 4
    # per row: the log-prob and the saved statistics (row max m, log s: one fp32 more than an absolute lse)
    assert traffic.stored == 3 * N * 4


@triton.jit
def _tile_product(a_ptr, b_ptr, c_ptr, M: tl.constexpr, K: tl.constexpr, N: tl.constexpr):
    m, k, n = tl.arange(0, M), tl.arange(0, K), tl.arange(0, N)
    a = tl.load(a_ptr + m[:, None] * K + k[None, :])
    b = tl.load(b_ptr + k[:, None] * N + n[None, :])
    c = tl.dot(a, b)
    tl.store(c_ptr + tl.program_id(0) * M * N + m[:, None] * N + n[None, :], c)


def test_triton_launches_record_grid_unique_bytes_and_dot_flops():
    a, b = torch.randn(16, 32), torch.randn(32, 16)
    c = torch.empty(3, 16, 16)
    rec = TritonLaunches()
    with rec.count():
        _tile_product[(3,)](a, b, c, 16, 32, 16)
    (launch,) = rec.log
    assert launch["kernel"] == "_tile_product" and launch["programs"] == 3
    # three programs read the same a and b: unique bytes count them once, requested bytes three times
    assert launch["loaded_bytes"] == (a.numel() + b.numel()) * 4
    assert launch["requested_bytes"] == 3 * (a.numel() + b.numel()) * 4 + c.numel() * 4
    assert launch["stored_bytes"] == c.numel() * 4
    assert launch["flops"] == 3 * 2 * 16 * 32 * 16
    torch.testing.assert_close(c, (a @ b).expand(3, 16, 16))


def test_dry_run_records_the_grid_without_running():
    a, b = torch.randn(16, 32), torch.randn(32, 16)
    c = torch.zeros(5, 16, 16)
    rec = TritonLaunches(dry_run=True)
    with rec.count():
        _tile_product[lambda meta: (meta["M"] // 16 * 5,)](a, b, c, 16, 32, 16)
    assert rec.log[0]["programs"] == 5 and rec.log[0]["requested_bytes"] == 0
    assert c.abs().sum() == 0


def test_eager_traffic_counts_ops_flops_and_skips_views_and_allocations():
    a, b = torch.randn(1000), torch.randn(1000)
    with EagerTraffic() as t:
        c = a + b                       # reads 8000, writes 4000
        c.view(10, 100).t()             # views: nothing
        torch.empty(10**6)              # allocation: nothing
    assert t.bytes == 12000 and t.launches == 1 and t.flops == 0
    x, y = torch.randn(8, 4), torch.randn(4, 3)
    with EagerTraffic() as t2:
        a.to(torch.bfloat16)            # reads 4000, writes 2000
        x @ y                           # reads 32 + 12 floats, writes 24; 2 M K N FLOPs
    assert t2.flops == 2 * 8 * 4 * 3 and t2.launches == 2
    assert t2.bytes == 6000 + (32 + 12 + 24) * 4
    acc = torch.zeros(8, 3)
    with EagerTraffic() as t3:
        acc.addmm_(x, y)                # in place (TRL's gradient GEMMs): the same 2 M K N
    assert t3.flops == 2 * 8 * 4 * 3
    del c


def test_peak_memory_tracks_frees():
    with PeakMemory() as pm:
        x = torch.ones(1000)            # 4000 bytes
        y = torch.ones(1000)            # 8000 live
        del x
        z = torch.ones(500)             # 6000 live
        del y, z
        w = torch.ones(100)
    assert pm.peak == 8000
    del w


def test_interpreter_copies_are_hidden_from_peak_memory():
    N, V = 8, 1024
    logits = torch.randn(N, V, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, V, (N,))
    with hide_interpreter_copies(), PeakMemory() as pm:
        fastppo.token_logprobs(logits, labels).backward(torch.ones(N))
    # the bf16 gradient plus per-row fp32 vectors: nothing near a second copy of the logits
    assert N * V * 2 <= pm.peak < N * V * 2 + 64 * N


@pytest.mark.parametrize("side", ["fastppo", "trl"])
def test_dry_run_on_fake_tensors_counts_what_the_real_run_counts(side):
    spec = OPS["token_logprobs"]
    shape = {"N": 16, "V": 1024, "prompt": 0.5}
    real, dry = count(spec, shape, side), count(spec, shape, side, dry_run=True)
    for key in ("launches", "eager_bytes", "eager_flops", "host_syncs"):
        assert real[key] == dry[key], key
    # fake tensors can hold a Python scalar as a 0-d tensor: a few bytes of difference at most
    assert abs(real["peak_bytes"] - dry["peak_bytes"]) <= 16
    assert {k: (v["launches"], v["programs"]) for k, v in real["kernels"].items()} == \
        {k: (v["launches"], v["programs"]) for k, v in dry["kernels"].items()}
    assert all(v["bytes"] == 0 for v in dry["kernels"].values())


def test_kernel_counts_scale_as_claimed():
    """Kernel counts are exactly linear in the op's monomials: a fit on some shapes predicts others."""
    spec = OPS["token_logprobs"]
    shapes = [{"N": n, "V": v, "prompt": 0.5} for n, v in ((16, 256), (32, 256), (16, 512), (32, 384), (48, 256))]
    measured = [(s, count(spec, s, "fastppo")["kernels"]["_logprobs_fwd_kernel"]) for s in shapes]
    model = LinearModel(spec.features, [(s, {"bytes": k["bytes"]}) for s, k in measured])
    assert model.max_rel_residual < 1e-12
    held_out = {"N": 24, "V": 300, "prompt": 0.5}
    assert model.predict(held_out)["bytes"] == count(spec, held_out, "fastppo")["kernels"]["_logprobs_fwd_kernel"][
        "bytes"]


def test_fused_loss_is_six_kernel_launches_at_the_floor():
    """logprobs_fwd, the multi-program loss aggregation (4 launches, kernels/loss_agg.py) and logprobs_bwd;
    no eager op."""
    spec = OPS["fused_ppo_loss"]
    shape = {"N": 16, "V": 2048, "prompt": 0.0}
    c = count(spec, shape, "fastppo")
    assert c["launches"] == 6 and c["eager_launches"] == 0
    assert {"_logprobs_fwd_kernel", "_logprobs_bwd_kernel"} <= set(c["kernels"])
    assert 1.0 <= c["bytes"] / spec.floor_bytes(shape, torch.bfloat16) < 1.05


@pytest.mark.parametrize("prompt,ratio", [(0.0, 2 / 3), (0.5, 3 / 4), (0.75, 5 / 6)])
def test_fused_loss_one_read_moves_two_thirds_of_the_floor(prompt, ratio):
    """The gradient formed in forward (kernels/fused_grad.py), upstream 1: a valid row read once and written
    once (4 of the floor's 6 bytes per bf16 element), a masked row its zero gradient (2 of 2); 6 kernel
    launches as on the two-pass path (the aggregation's 4, the row kernel, backward's rescaling, which moves no
    row at upstream 1) and one eager op: the 0-d copy of the loss that hands it to autograd."""
    spec = OPS["fused_ppo_loss_one_read"]
    shape = {"N": 16, "V": 2048, "prompt": prompt}
    c = count(spec, shape, "fastppo")
    assert c["launches"] == 7 and c["eager_launches"] == 1 and c["eager_bytes"] == 8
    assert {"_fused_grad_kernel", "_logprobs_bwd_kernel"} <= set(c["kernels"])
    assert "_logprobs_fwd_kernel" not in c["kernels"]
    assert ratio <= c["bytes"] / spec.floor_bytes(shape, torch.bfloat16) < ratio + 0.02
    if prompt == 0.0:
        assert c["bytes"] / spec.floor_bytes(shape, torch.bfloat16) <= 0.70


def test_trl_selective_kernel_on_a_half_masked_batch_is_at_the_masked_floor():
    """TRL skips masked rows (reads nothing, writes their zero gradient): its kernels' bytes sit on the
    masked floor; its eager part is two label ops (clamp, != -100)."""
    shape = {"N": 64, "V": 1024, "prompt": 0.5}
    c = count(OPS["token_logprobs"], shape, "trl")
    floor = logits_floor(shape, torch.bfloat16)
    assert n_valid(shape) == 32
    kernel_bytes = sum(k["bytes"] for k in c["kernels"].values())
    assert 1.0 <= kernel_bytes / floor < 1.02
    assert c["launches"] == 4
    assert {k: v["programs"] for k, v in c["kernels"].items()} == {"_forward_kernel": 64, "_backward_kernel": 64}


def test_liger_grpo_loss_on_a_half_masked_batch():
    shape = {"N": 32, "V": 1024, "prompt": 0.5}
    c = count(OPS["fused_ppo_loss"], shape, "liger")
    floor = logits_floor(shape, torch.bfloat16)
    kernel_bytes = sum(k["bytes"] for k in c["kernels"].values())
    assert 1.0 <= kernel_bytes / floor < 1.05
    # one program per (sequence, position) of the B x T grid
    assert {k: v["programs"] for k, v in c["kernels"].items()} == {"_grpo_loss_fwd_kernel": 32,
                                                                  "_grpo_loss_bwd_kernel": 32}


@pytest.mark.parametrize("op,side,factor", [("linear_logprobs", "trl", 8), ("fused_linear_ppo_loss", "liger", 8),
                                            ("fused_linear_ppo_loss", "trl", 8),
                                            ("fused_linear_ppo_loss", "fastppo", 6)])
def test_linear_peers_flops(op, side, factor):
    """TRL projects only the valid rows (forward 2, recomputed logits 2, two products 4: 8 N_valid H V), for its
    log-probs and inside GRPOTrainer's loss alike; Liger projects every row, with the same 8; fastppo's fused
    linear loss forms its gradient in the forward pass on the valid rows (6 N_valid H V; H a whole number of its
    kernels' row and H tiles, which tl.dot counts whole)."""
    shape = {"N": 128, "H": 128, "V": 2048, "prompt": 0.5}
    c = count(OPS[op], shape, side)
    rows = shape["N"] if side == "liger" else n_valid(shape)
    assert c["flops"] == factor * rows * shape["H"] * shape["V"]


def test_distillation_flops_of_every_side():
    """The distillation row (H = Hs = Ht): fastppo's linear_divergence_loss projects the valid rows' teacher
    logits once and the student's with its gradient formed in the forward pass (2 + 6 N_valid H V); TRL's
    ChunkedDivergenceFunction projects both models twice in forward (a statistics pass, then the divergence pass)
    and both again in backward before the two products (8 + 8); Liger's JSD projects every row, the gradient formed
    in forward by autograd (8 N H V); the eager reference every row, backward through the student (8 N H V)."""
    shape = {"N": 64, "H": 64, "V": 2048, "prompt": 0.5}
    unit = n_valid(shape) * shape["H"] * shape["V"]
    flops = {side: count(OPS["linear_divergence"], shape, side)["flops"] for side in OPS["linear_divergence"].sides}
    assert flops == {"fastppo": 8 * unit, "trl": 16 * unit, "liger": 16 * unit, "eager": 16 * unit}


def test_distillation_head_products_read_each_weight_once_per_chunk():
    """fastppo.head_gemm as on a GPU (fp32-output GEMMs of the bf16 operands): at N=8192 H=4096 V=151552 the loss
    runs in 5 chunks of 1771 rows (2 GiB of fp32 logits for both models), each reading both weights once in bf16
    and the fp32 d(weight) sum once: 5 x 14 V H bytes of weight traffic plus ~18 bytes per logit for the products'
    outputs and the tile's rounding; 121 GB and 77 eager launches measured (896 GB and 22,893 launches when each
    chunk upcast both weights in blocks)."""
    shape = {"N": 8192, "H": 4096, "V": 151552, "prompt": 0.0}
    c = count(OPS["linear_divergence"], shape, "fastppo", dry_run=True)
    vh, nv = shape["V"] * shape["H"], shape["N"] * shape["V"]
    assert c["eager_flops"] == 8 * nv * shape["H"]
    assert c["eager_bytes"] < 5 * 14 * vh + 80 * nv and c["launches"] < 100


def test_projection_charges_each_launch_by_its_grid():
    assert projected_ms("H100", 3.35e9, 0, 0) == 1.0
    assert projected_ms("A100", 0, 312e9, 1) == pytest.approx(1.004)
    # a one-program kernel streams at one SM's share of the bandwidth
    assert projected_ms("H100", 3.35e9, 0, 0, programs=1) == pytest.approx(132.0)
    assert projected_ms("A100", 2.0e9, 0, 0, programs=54) == pytest.approx(2.0)
    assert projected_ms("H100", 3.35e9, 0, 0, programs=10**6) == 1.0
    two = projected_ms_per_launch("H100", [(3.35e9, 0, 1000), (3.35e6, 0, 1)], 0.0, 2)
    assert two == pytest.approx(1.0 + 0.132 + 0.008)


def test_report_sides_side_by_side_and_missing_peers_reported(tmp_path, monkeypatch):
    """A tiny token_logprobs sweep through the whole report: every side's counts and projections
    exist, a peer that cannot be imported is reported as missing (not dropped), the files are written."""
    small = dataclasses.replace(OPS["token_logprobs"], measure=tuple(
        {"N": n, "V": v, "prompt": 0.0} for n, v in ((16, 256), (32, 256), (16, 512), (32, 384), (48, 256))),
        sweep=({"N": 4096, "V": 32000, "prompt": 0.0},))
    monkeypatch.setitem(bench_ops.OPS, "token_logprobs", small)
    monkeypatch.setitem(report.OPS, "token_logprobs", small)
    monkeypatch.setattr(bench_ops.peers, "missing", lambda peer: "trl not importable (test)" if peer == "trl" else None)
    rows = report.model_rows(["token_logprobs"], torch.bfloat16)
    big = [r for r in rows if r["source"] == "derived"]
    assert len(big) == 1 and big[0]["trl_status"].startswith("missing") and big[0]["liger_status"] == "n/a"
    r = big[0]
    assert r["fastppo_bytes_over_floor"] == pytest.approx(1.0, abs=1e-3)
    assert r["eager_bytes"] > 20 * r["fastppo_bytes"]
    assert r["fastppo_launches"] == 2 and r["eager_launches"] > 10
    assert r["fastppo_H100_projected_ms"] < r["eager_H100_projected_ms"]
    doc, png = report.write_outputs(rows, tmp_path, cuda=False)
    assert "| token_logprobs | N=4096 V=32000 | 0% |" in doc and "| missing |" in doc
    assert "TRL: missing: trl not importable (test)" in doc
    assert f"Generated by `fastppo bench --out {tmp_path}`." in doc       # the real folder, not docs/bench
    assert (tmp_path / "bench.csv").read_text().count("\n") == len(rows) + 1
    assert png.stat().st_size > 10_000


def test_launch_counter_records_grids_per_launch_only_while_counting():
    from fastppo.kernels.launches import _log, count_launches, record_launch

    record_launch("outside", torch.ones(2), grid=(7,))
    with count_launches() as outer:
        record_launch("k", torch.ones(3), grid=(2, 3))
        with count_launches() as inner:
            record_launch("k", None, grid=8)
        record_launch("j", torch.ones(1))
    assert outer == {"k": 2, "j": 1} and outer.io_bytes == 16
    assert [(x.name, x.programs) for x in outer.log] == [("k", 6), ("k", 8), ("j", None)]
    assert outer.programs == {"k": 8} and inner.programs == {"k": 8}
    assert _log == []


@pytest.mark.parametrize("op", ["token_logprobs", "fused_ppo_loss"])
def test_fastppo_on_a_half_masked_batch_is_at_the_masked_floor(op):
    """A masked row costs only its zero gradient (#14.1), counted by the same counter as the peers."""
    shape = {"N": 32, "V": 2048, "prompt": 0.5}
    c = count(OPS[op], shape, "fastppo")
    assert 1.0 <= c["bytes"] / logits_floor(shape, torch.bfloat16) <= 1.02


@pytest.mark.parametrize("op", ["token_logprobs", "fused_ppo_loss", "fused_ppo_loss_one_read", "linear_logprobs",
                                "fused_linear_ppo_loss", "linear_divergence"])
def test_every_side_computes_the_same_numbers(op):
    """The sides of a row compute the same thing (else the comparison means nothing): outputs and the
    gradients of the leaves agree with the eager reference on a half-masked fp32 batch."""
    from fastppo.bench.peers import as_on_gpu

    spec = OPS[op]
    shape = {"N": 16, "V": 512, "prompt": 0.5} if "H" not in spec.dims else {"N": 16, "H": 32, "V": 256,
                                                                              "prompt": 0.5}
    results = {}
    for side in spec.sides:
        inputs = spec.make(shape, torch.float32, "cpu")
        with as_on_gpu():
            outs = spec.sides[side](inputs)
            torch.autograd.backward(list(outs), [torch.full_like(o, 0.5) for o in outs])
        leaves = [v for k, v in inputs.items() if isinstance(v, torch.Tensor) and v.requires_grad]
        grads = [(inputs["liger_logits"].grad[:, :-1] if k == "liger_logits" else v.grad)
                 for k, v in inputs.items() if isinstance(v, torch.Tensor) and v.requires_grad
                 and (side == "liger" or k != "liger_logits") and v.grad is not None]
        assert leaves
        results[side] = ([o.detach() for o in outs], grads)
    ref_outs, ref_grads = results["eager"]
    for side, (outs, grads) in results.items():
        for a, b in zip(outs, ref_outs):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=f"{side} output")
        assert len(grads) == len(ref_grads), side
        for a, b in zip(grads, ref_grads):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=f"{side} gradient")


def test_partial_run_updates_the_table_in_out(tmp_path, monkeypatch, capsys):
    """`fastppo bench --ops A --out DIR` over an existing table: A's rows replaced, the other ops' rows kept
    value for value, bench.md / bench.png written from the merged table saying which command wrote which rows;
    another dtype refused before anything is measured. The table: the committed docs/bench/bench.csv (real
    rows of two ops, read back as written); the new rows: its ppo_policy_loss rows with other counts."""
    import csv
    from pathlib import Path

    from fastppo.bench import cli

    docs = Path(__file__).resolve().parents[2] / "docs" / "bench"
    with open(docs / "bench.csv", newline="") as f, open(tmp_path / "bench.csv", "w", newline="") as out:
        table = csv.DictReader(f)       # as a table written before rows named their command
        w = csv.DictWriter(out, fieldnames=[k for k in table.fieldnames or () if k != "command"], extrasaction="ignore")
        w.writeheader()
        w.writerows(r for r in table if r["op"] in ("token_logprobs", "ppo_policy_loss"))
    first = "fastppo bench --out docs/bench --dtype bf16"
    (tmp_path / "bench.md").write_text(f"# fastppo bench\n\nGenerated by `{first}`.\n")
    before = report.read_csv(tmp_path / "bench.csv")
    header = (tmp_path / "bench.csv").read_text().splitlines()[0]
    assert {"token_logprobs", "ppo_policy_loss"} <= {r["op"] for r in before}
    assert before[0]["dtype"] == "bfloat16" and isinstance(before[0]["fastppo_bytes"], int)
    new = [{k: v for k, v in r.items() if k != "command"} for r in before if r["op"] == "ppo_policy_loss"]
    for r in new:
        r["fastppo_launches"] += 7
    calls = []
    monkeypatch.setattr(report, "model_rows", lambda ops, dtype, bar: calls.append(ops) or [dict(r) for r in new])

    # a table whose bench.md names no command: its rows are an earlier run's, not this one's
    doc = report.document(report.merge_rows(before, [], ["ppo_policy_loss"], "fastppo bench --out D (earlier run)"),
                          False, "this")
    assert doc.count("Generated by `fastppo bench --out D (earlier run)`.") == 1 and "`this`" not in doc

    with pytest.raises(SystemExit):         # another dtype: refused, nothing measured, nothing written
        cli.main(["--ops", "ppo_policy_loss", "--out", str(tmp_path), "--dtype", "fp32"])
    err = capsys.readouterr().err
    assert "holds rows of dtype bfloat16, this run measures float32" in err and "bench.csv" in err
    assert calls == [] and report.read_csv(tmp_path / "bench.csv") == before

    assert cli.main(["--ops", "ppo_policy_loss", "--out", str(tmp_path), "--dtype", "bf16"]) == 0
    assert calls == [["ppo_policy_loss"]]
    after = report.read_csv(tmp_path / "bench.csv")
    again = f"fastppo bench --out {tmp_path} --dtype bf16 --ops ppo_policy_loss"
    assert [r["op"] for r in after] == [r["op"] for r in before]           # same rows, in the same order
    columns = (tmp_path / "bench.csv").read_text().splitlines()[0].split(",")   # the table's columns first, in order
    assert columns == header.split(",") + ["command"]
    for b, a in zip(before, after):
        if b["op"] == "ppo_policy_loss":
            assert a == {**b, "fastppo_launches": b["fastppo_launches"] + 7, "command": again}
        else:
            assert a == {**b, "command": first}
    doc = (tmp_path / "bench.md").read_text()
    assert f"Generated by `{first}`; the rows of ppo_policy_loss by `{again}`." in doc
    big = next(r for r in after if r["op"] == "ppo_policy_loss" and r["source"] == "derived")
    assert f"{big['fastppo_launches']} launches" in doc and "| token_logprobs | N=16384 V=151936 | 75% |" in doc
    assert (tmp_path / "bench.png").stat().st_size > 10_000
