from fastppo.cli import main


def test_check_runs_every_op_against_its_reference(capsys):
    assert main(["check"]) == 0
    out = capsys.readouterr().out
    assert "backend per device: cpu -> triton" in out or "cuda" in out
    for op in ("token_logprobs", "fused_ppo_loss", "kl_penalty", "full_kl", "gae", "linear_logprobs"):
        assert op in out
    assert "all ops agree with the reference" in out


def test_usage_and_unknown_command(capsys):
    assert main([]) == 2
    assert main(["--help"]) == 0
    assert main(["fly"]) == 2
    assert "unknown command" in capsys.readouterr().err


def test_bench_aot_table(capsys):
    assert main(["bench", "--aot"]) == 0
    out = capsys.readouterr().out
    assert "| logprobs_fwd[bf16] | sm_90 |" in out and "| linear_fwd[bf16] | sm_80 |" in out


def test_bench_dtype_help_and_behaviour_agree(capsys):
    """Every --dtype the help offers is accepted (the parse goes on to the --ops check)."""
    assert main(["bench", "--help"]) == 0
    help_text = capsys.readouterr().out
    for name in ("bf16", "fp16", "fp32", "bfloat16"):
        assert name in help_text
        assert main(["bench", "--dtype", name, "--ops", "no_such_op"]) == 2
        err = capsys.readouterr().err
        assert "unknown ops ['no_such_op']" in err and "invalid choice" not in err
    assert main(["bench", "--dtype", "int8"]) == 2
    assert "invalid choice: 'int8'" in capsys.readouterr().err


def test_version_and_help_on_every_subcommand(capsys):
    import fastppo

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"fastppo {fastppo.__version__}"
    for cmd in ("check", "train", "bench", "plot"):
        assert main([cmd, "--help"]) == 0, cmd
        out = capsys.readouterr().out
        assert out.startswith(f"usage: fastppo {cmd}"), (cmd, out[:80])
    assert main(["check", "--bogus"]) == 2
    assert "usage: fastppo check" in capsys.readouterr().err


def test_plot_overlays_runs_from_metrics_files(tmp_path, capsys):
    import json
    import math

    for name, slope in (("a", 1.0), ("b", 0.5)):
        rows = [{"iteration": i, "reward_mean": slope * i, "task_score_mean": min(1, 0.05 * i * slope),
                 "kl_mean": 0.1 * i, "entropy": 2.0 - 0.02 * i, "clipfrac": 0.1, "policy_loss": math.sin(i),
                 "value_loss": 1 / (1 + i)} for i in range(30)]
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"itera')
    png = tmp_path / "both.png"
    assert main(["plot", str(tmp_path / "a"), str(tmp_path / "b"), "-o", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["plot", str(tmp_path / "a")]) == 0
    assert (tmp_path / "a" / "curves.png").exists()
    assert main(["plot", str(tmp_path / "missing")]) == 2
    assert "metrics.jsonl does not exist" in capsys.readouterr().err


def test_smoothing_is_a_bias_corrected_ema():
    from fastppo.trainer.plot import smooth

    assert smooth([1.0, 1.0, 1.0], 0.9) == [1.0, 1.0, 1.0]
    s = smooth([0.0, 10.0, float("nan"), 10.0], 0.5)
    assert s[0] == 0.0 and s[1] == 10.0 * 0.5 / 0.75 and s[2] == s[1]
