"""`fastppo train --mode distill --teacher PATH`: on-policy distillation (the policy samples; its loss is
fastppo.linear_divergence to the teacher on those samples) from local folders: the divergence to the teacher falls,
the flags are validated before any model is built."""

import json
import math

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


# ---------------------------------------------------------------------- the distillation demo (no --policy)
DEMO = dict(mode="distill", batch_size=16, minibatches=2, ppo_epochs=2, sft_steps=3, teacher_steps=3, iterations=1,
            save_every=1, progress=False, backend="torch")


def _demo_trainer(tmp_path, **kw):
    from fastppo.trainer import PPOTrainer
    from fastppo.trainer.config import TrainConfig

    return PPOTrainer.from_config(TrainConfig(out=str(tmp_path / "run"), **{**DEMO, **kw}).validate(),
                                  log=lambda *_: None)


def _response_logp64(model, ro, T):
    """float64 log_softmax(z / T) [B, R, V] of `model` at the response positions (its own forward)."""
    P, R = ro.prompt_len, ro.response.shape[1]
    pos = (ro.attention_mask.long().cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        z = model(input_ids=ro.sequences, attention_mask=ro.attention_mask, position_ids=pos).logits
    return torch.log_softmax(z[:, P - 1:P + R - 1].double() / T, -1)


def test_distill_rollout_terms_and_the_advantage_against_float64(tmp_path):
    """The rollout's teacher log-probs, the exact per-token KL(policy || teacher) (teacher_kl) and, with
    --distill_loss advantage, A_t = -(log p_student - log p_teacher) at the sampled token, from both models'
    float64 logits; 0 at masked positions."""
    from fastppo.trainer.launch import backend_scope

    tr = _demo_trainer(tmp_path, distill_loss="advantage", temperature=0.8)
    with backend_scope("torch"):
        ro = tr.rollout(torch.Generator().manual_seed(3))
        adv, returns, _ = tr.advantages(ro)
    assert returns is None and not ro.mask.all()
    lp_s, lp_t = _response_logp64(tr.policy, ro, 0.8), _response_logp64(tr.teacher, ro, 0.8)
    y = ro.response.unsqueeze(-1)
    at_y_s, at_y_t = lp_s.gather(-1, y).squeeze(-1), lp_t.gather(-1, y).squeeze(-1)
    kl = (lp_s.exp() * (lp_s - lp_t)).sum(-1)
    zero = torch.zeros((), dtype=torch.float64)
    torch.testing.assert_close(ro.teacher_logprobs.double(), torch.where(ro.mask, at_y_t, zero), rtol=0, atol=1e-5)
    torch.testing.assert_close(ro.teacher_kl.double(), torch.where(ro.mask, kl, zero), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(adv.double(), torch.where(ro.mask, at_y_t - at_y_s, zero), rtol=0, atol=2e-5)
    assert adv[ro.mask].abs().max() > 0.1


@pytest.mark.slow
def test_distillation_demo_learns_the_task(tmp_path):
    """`fastppo train --mode distill` (no --policy): a teacher trained on the right answers, a student warmed up
    on the answer format only; on-policy distillation raises the student's task score and brings it to the
    teacher (seed 0; no timing asserted)."""
    args = ["--mode", "distill", "--out", str(tmp_path / "run"), "--iterations", "16", "--batch_size", "32",
            "--lr", "3e-3", "--progress", "false", "--backend", "torch"]
    assert main(args) == 0
    m = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    n = len(m) // 4
    score = [r["task_score_mean"] for r in m]
    kl = [r["teacher_kl"] for r in m]
    assert sum(score[-n:]) / n > sum(score[:n]) / n + 0.4, score
    assert sum(kl[-n:]) < 0.3 * sum(kl[:n]), kl
    assert (tmp_path / "run" / "frozen" / "teacher" / "tokenizer_config.json").exists()


def test_an_advantage_step_moves_the_policy_along_the_advantage(tmp_path):
    """--distill_loss advantage: the policy step on a rollout raises the log-probs of the tokens the teacher
    prefers (A > 0) and lowers the others: sum_t A_t (log p_new - log p_old) > 0, where the padded and packed
    layouts agree."""
    from fastppo.trainer.launch import backend_scope
    from fastppo.trainer.rollout import response_logprobs

    moved = {}
    for pack in (True, False):
        tr = _demo_trainer(tmp_path / str(pack), distill_loss="advantage", pack=pack)
        with backend_scope("torch"):
            ro = tr.rollout(torch.Generator().manual_seed(5))
            adv, _, _ = tr.advantages(ro)
            logs = tr._policy_step(ro, adv)
            with torch.no_grad():
                new = response_logprobs(tr.policy, ro, tr.cfg.temperature)
        assert logs and math.isfinite(logs["policy_loss"])
        moved[pack] = ((new - ro.old_logprobs) * adv)[ro.mask].sum().item()
    assert moved[True] > 0
    assert moved[True] == pytest.approx(moved[False], rel=1e-3)


def test_distillation_demo_resumes_with_its_teacher(tmp_path):
    from fastppo.trainer import PPOTrainer
    from fastppo.trainer.config import TrainConfig

    tr = _demo_trainer(tmp_path)
    tr.train()
    resumed = PPOTrainer.from_config(TrainConfig(resume=str(tmp_path / "run"), iterations=2, progress=False)
                                     .validate(), log=lambda *_: None)
    assert resumed.iteration == 1 and resumed.reward_model is None
    for a, b in zip(tr.teacher.parameters(), resumed.teacher.parameters()):
        assert torch.equal(a, b)
    assert len(resumed.train()) == 2


@pytest.mark.parametrize("extra,why", [
    (("--distill_loss", "kl"), "--distill_loss='kl': must be divergence or advantage"),
    (("--teacher_steps", "-1"), "--teacher_steps=-1: must be >= 0"),
])
def test_distill_demo_flags_are_validated(tmp_path, capsys, extra, why):
    assert main(["--mode", "distill", "--out", str(tmp_path / "run"), *extra]) == 2
    assert why in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_teacher_needs_a_policy(tmp_path, capsys):
    _save_teacher(tmp_path)
    assert main(["--mode", "distill", "--teacher", str(tmp_path / "teacher"), "--out", str(tmp_path / "run")]) == 2
    assert "--teacher needs --policy and --prompts" in capsys.readouterr().err
