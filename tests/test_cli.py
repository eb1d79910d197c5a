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
