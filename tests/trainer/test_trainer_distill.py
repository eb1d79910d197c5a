"""`fastppo train --mode distill --teacher PATH`: on-policy distillation (the policy samples; its loss is
fastppo.linear_divergence to the teacher on those samples) from local folders: the divergence to the teacher falls,
the flags are validated before any model is built."""

import json

import pytest
import torch

from fastppo.trainer.cli import main
from tests.trainer.test_trainer import (
    _one_thread_and_backend_untouched,  # noqa: F401  (autouse fixture)
    _save_tiny_hf_models,
)


def _save_teacher(root):
    """A wider Llama with the policy's vocabulary and a peaked head (a teacher worth matching)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(7)
    cfg = LlamaConfig(vocab_size=14, hidden_size=48, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, max_position_embeddings=32, pad_token_id=0, bos_token_id=1,
                      eos_token_id=2)
    teacher = LlamaForCausalLM(cfg)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(20.0)
    teacher.save_pretrained(root / "teacher")


def _args(tmp_path, *extra):
    return ["--policy", str(tmp_path / "policy"), "--prompts", str(tmp_path / "prompts.jsonl"), "--out",
            str(tmp_path / "run"), "--batch_size", "8", "--minibatches", "2", "--ppo_epochs", "2",
            "--max_new_tokens", "4", "--progress", "false", "--backend", "torch", "--mode", "distill", *extra]


@pytest.mark.parametrize("beta", ["1.0", "0.5"])
def test_distillation_brings_the_policy_to_the_teacher(tmp_path, beta):
    _save_tiny_hf_models(tmp_path)
    _save_teacher(tmp_path)
    assert main(_args(tmp_path, "--teacher", str(tmp_path / "teacher"), "--distill_beta", beta, "--iterations", "8",
                      "--lr", "1e-2")) == 0
    m = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    div = [r["divergence"] for r in m]
    assert len(m) == 8 and all(r["skipped_steps"] == 0 for r in m)
    assert sum(div[-2:]) < 0.5 * sum(div[:2]), div


@pytest.mark.parametrize("extra,flag,why", [
    ((), "teacher", "--mode distill and --teacher go together"),
    (("--teacher", "T", "--distill_beta", "1.5"), "distill_beta", r"must be in \[0, 1\]"),
    (("--teacher", "missing"), "teacher", "no such folder"),
])
def test_distill_flags_are_validated_before_any_model_is_built(tmp_path, capsys, extra, flag, why):
    import re

    _save_tiny_hf_models(tmp_path)
    (tmp_path / "T").mkdir()
    extra = tuple(str(tmp_path / e) if e in ("T", "missing") else e for e in extra)
    assert main(_args(tmp_path, *extra)) == 2
    err = capsys.readouterr().err
    assert f"--{flag}" in err and re.search(why, err), err
    assert not (tmp_path / "run").exists()


def test_teacher_needs_distill_mode(tmp_path, capsys):
    _save_tiny_hf_models(tmp_path)
    _save_teacher(tmp_path)
    args = _args(tmp_path, "--teacher", str(tmp_path / "teacher"), "--reward", str(tmp_path / "rm"))
    args[args.index("distill")] = "grpo"
    assert main(args) == 2
    assert "--mode distill and --teacher go together" in capsys.readouterr().err
