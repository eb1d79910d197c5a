import json

import pytest
import torch

from fastppo.trainer import checkpoint
from fastppo.trainer.cli import main, parse_config, run
from fastppo.trainer.config import TrainConfig

# the PyTorch backend: under the interpreter one Triton GAE call takes ~minutes; the Triton path of the trainer
# is covered by test_demo_ppo_end_to_end[triton] and the NaN-loss test
TINY = dict(iterations=2, batch_size=8, minibatches=2, ppo_epochs=1, sft_steps=3, reward_steps=3, save_every=1,
            progress=False, backend="torch")


@pytest.fixture(autouse=True)
def _one_thread_and_backend_untouched():
    """One intra-op thread (tiny matrices: faster, above all on a busy machine, and a trajectory that does not
    depend on the core count). The trainer's --backend applies to its own work only: the process-wide backend
    choice is the same after every test (it leaked into later tests once)."""
    from fastppo.backend import forced_backend

    before, threads = forced_backend(), torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    assert forced_backend() == before, "a trainer run changed the process-wide fastppo backend"


def _cfg(tmp_path, **kw):
    return TrainConfig(out=str(tmp_path / "run"), **{**TINY, **kw}).validate()


def _metrics(path):
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_demo_ppo_end_to_end(tmp_path, backend):
    cfg = _cfg(tmp_path, backend=backend)
    metrics = run(cfg, log=lambda *_: None)
    out = tmp_path / "run"
    assert [m["iteration"] for m in _metrics(out)] == [0, 1]
    for key in ("reward_mean", "kl_mean", "task_score_mean", "policy_loss", "value_loss", "clipfrac", "entropy",
                "tokens_per_s", "skipped_steps"):
        assert key in metrics[-1], key
    assert (out / "curves.png").stat().st_size > 0
    ckpts = checkpoint.list_checkpoints(out)
    assert [p.name for p in ckpts] == ["checkpoint-000001", "checkpoint-000002"]
    assert (ckpts[-1] / "policy" / "model.safetensors").exists()


def test_demo_grpo(tmp_path):
    metrics = run(_cfg(tmp_path, mode="grpo", group_size=4, kl_kind="low_var_kl"), log=lambda *_: None)
    assert "value_loss" not in metrics[-1] and "policy_loss" in metrics[-1]
    assert not (checkpoint.latest(tmp_path / "run") / "critic").exists()


def test_resume_reproduces_an_uninterrupted_run(tmp_path):
    full = run(TrainConfig(out=str(tmp_path / "a"), **{**TINY, "iterations": 4, "save_every": 2}).validate(),
               log=lambda *_: None)
    run(TrainConfig(out=str(tmp_path / "b"), **{**TINY, "iterations": 2, "save_every": 2}).validate(),
        log=lambda *_: None)
    resumed = run(TrainConfig(out=str(tmp_path / "b"), resume=str(tmp_path / "b"),
                              **{**TINY, "iterations": 4, "save_every": 2}).validate(), log=lambda *_: None)
    assert len(resumed) == 4
    skip = {"tokens_per_s", "time_s"}
    for a, b in zip(full, resumed):
        assert {k: v for k, v in a.items() if k not in skip} == {k: v for k, v in b.items() if k not in skip}
    from safetensors.torch import load_file

    wa = load_file(checkpoint.latest(tmp_path / "a") / "policy" / "model.safetensors")
    wb = load_file(checkpoint.latest(tmp_path / "b") / "policy" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_checkpoint_is_atomic(tmp_path, monkeypatch):
    from transformers import LlamaForCausalLM

    from fastppo.trainer.demo import tiny_llama_config

    model = LlamaForCausalLM(tiny_llama_config())
    checkpoint.save(tmp_path, 1, {"policy": model}, {"iteration": 1}, {}, keep=2)

    def crash(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.torch, "save", crash)
    with pytest.raises(OSError):
        checkpoint.save(tmp_path, 2, {"policy": model}, {"iteration": 2}, {}, keep=2)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["checkpoint-000001"]
    assert checkpoint.load_state(checkpoint.latest(tmp_path))["iteration"] == 1


def test_non_finite_loss_skips_the_step(tmp_path):
    from fastppo.trainer.ppo import PPOTrainer

    trainer = PPOTrainer.from_config(_cfg(tmp_path), log=lambda *_: None)
    before = [p.detach().clone() for p in trainer.policy.parameters()]
    loss = sum(p.sum() for p in trainer.policy.parameters()) * float("nan")
    with pytest.warns(UserWarning, match="non-finite loss"):
        assert not trainer._step(loss, trainer.policy_opt)
    assert trainer.skipped_steps == 1
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.policy.parameters()))


def test_config_errors_and_files(tmp_path):
    with pytest.raises(ValueError, match="--mode"):
        TrainConfig(mode="a2c").validate()
    with pytest.raises(ValueError, match="--minibatches"):
        TrainConfig(batch_size=10, minibatches=3).validate()
    with pytest.raises(ValueError, match="--group_size"):
        TrainConfig(mode="grpo", batch_size=10, group_size=4).validate()
    with pytest.raises(ValueError, match="--prompts"):
        TrainConfig(policy=str(tmp_path)).validate()
    with pytest.raises(ValueError, match="--kl_kind"):
        TrainConfig(kl_kind="k7").validate()
    assert TrainConfig().validate().kl_kind == "k1"
    assert TrainConfig(mode="grpo").validate().kl_kind == "low_var_kl"
    assert main(["--lr", "-1"]) == 2
    cfg_file = tmp_path / "c.json"
    cfg_file.write_text(json.dumps({"iterations": 3, "mode": "grpo", "group_size": 4}))
    cfg = parse_config([str(cfg_file)])
    assert cfg.iterations == 3 and cfg.mode == "grpo"
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("iterations: 7\nseed: 3\n")
    assert parse_config([str(yaml_file)]).seed == 3
    assert parse_config(["--iterations", "9", "--seed", "4"]).iterations == 9


def _save_tiny_hf_models(root):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        LlamaForSequenceClassification,
        PreTrainedTokenizerFast,
    )

    words = ["<pad>", "<s>", "</s>", "what", "is", "the", "capital", "of", "france", "paris", "rome", "?", "yes", "no"]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    cfg = LlamaConfig(vocab_size=len(words), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32, pad_token_id=0,
                      bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(cfg).save_pretrained(root / "policy")
    tok.save_pretrained(root / "policy")
    LlamaForSequenceClassification(LlamaConfig(**{**cfg.to_dict(), "num_labels": 1})).save_pretrained(root / "rm")
    (root / "prompts.jsonl").write_text("\n".join(json.dumps({"prompt": p}) for p in
                                                  ["what is the capital of france ?", "is rome the capital ?"]))


@pytest.mark.parametrize("mode", ["ppo", "grpo"])
def test_real_models_from_local_folders(tmp_path, mode):
    _save_tiny_hf_models(tmp_path)
    args = ["--policy", str(tmp_path / "policy"), "--reward", str(tmp_path / "rm"), "--prompts",
            str(tmp_path / "prompts.jsonl"), "--out", str(tmp_path / "run"), "--iterations", "1", "--batch_size", "4",
            "--minibatches", "1", "--ppo_epochs", "1", "--max_new_tokens", "3", "--progress", "false",
            "--backend", "torch", "--mode", mode,
            "--group_size", "2"]
    assert main(args) == 0
    m = _metrics(tmp_path / "run")
    assert len(m) == 1 and "task_score_mean" not in m[0]
    assert (checkpoint.latest(tmp_path / "run") / "policy" / "config.json").exists()


# The cheapest demo schedule that learns on every seed tried: 40 iterations at lr 2e-3 after 200 reward-model and
# 100 warm-up steps. Measured task-score gain (first fifth -> last fifth), PyTorch backend, one thread, with dropout
# off (the trainer's default since round 3): fp32 seeds 0 / 1 / 2: +0.143 / +0.259 / +0.346; bf16: +0.223 / +0.405
# / +0.496 (the demo's first fifth scores about 0.2). The gain is chaotic in rounding (any change in summation
# order moves it by ~0.1), so these tests pin seed 0 and ask for a gain of 0.1, below every seed's, with the
# reward rising too; every test here runs with one thread (autouse fixture above).
SHORT_DEMO = dict(iterations=40, reward_steps=200, sft_steps=100, lr=2e-3, seed=0, progress=False, backend="torch")


def _gain(metrics, key):
    fifth = len(metrics) // 5
    return (sum(m[key] for m in metrics[-fifth:]) - sum(m[key] for m in metrics[:fifth])) / fifth


@pytest.mark.slow
def test_demo_learns_the_task(tmp_path):
    """The demo's ground-truth task score and reward rise from the first fifth of iterations to the last."""
    metrics = run(TrainConfig(out=str(tmp_path / "demo"), **SHORT_DEMO).validate(), log=lambda *_: None)
    assert _gain(metrics, "task_score_mean") >= 0.1
    assert _gain(metrics, "reward_mean") > 0


@pytest.mark.slow
def test_bf16_demo_learns_the_task(tmp_path):
    """--bf16: the forwards run in bfloat16 autocast, the weights and optimiser state stay fp32, and it learns."""
    from fastppo.trainer import PPOTrainer

    trainer = PPOTrainer.from_config(TrainConfig(out=str(tmp_path / "demo"), bf16=True, **SHORT_DEMO).validate(),
                                     log=lambda *_: None)
    ids = torch.tensor([[1, 3, 6, 4]])
    with trainer._amp():
        assert trainer.policy(input_ids=ids).logits.dtype == torch.bfloat16
        assert trainer.critic(input_ids=ids).logits.dtype == torch.bfloat16
    metrics = trainer.train()
    assert all(p.dtype == torch.float32 for p in trainer.policy.parameters())
    assert all(v.dtype == torch.float32 for st in trainer.policy_opt.state.values() for v in st.values()
               if torch.is_tensor(v) and v.dim() > 0)
    assert _gain(metrics, "task_score_mean") >= 0.1
    assert _gain(metrics, "reward_mean") > 0
