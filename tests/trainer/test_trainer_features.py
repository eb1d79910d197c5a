"""Trainer features: report_to (TensorBoard with TRL's names), LoRA, Python reward functions, dataset prompts,
evaluate(), phases / progress lines, the NaN-loss guard on both backends."""

import importlib.util
import json
import sys

import pytest
import torch

import fastppo.backend
from fastppo.trainer import PPOTrainer, checkpoint
from fastppo.trainer.cli import main, run
from fastppo.trainer.config import TrainConfig
from fastppo.trainer.launch import backend_scope
from tests.trainer.test_trainer import (
    _one_thread_and_backend_untouched,  # noqa: F401  (autouse fixture)
    _save_tiny_hf_models,
)

TINY = dict(iterations=2, batch_size=8, minibatches=2, ppo_epochs=1, sft_steps=3, reward_steps=3, save_every=1,
            progress=False, backend="torch")  # the Triton path: test_demo_ppo_end_to_end[triton], NaN test
QUIET = dict(log=lambda *_: None)




def _metrics(path):
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def test_tensorboard_events_use_trl_metric_names(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    metrics = run(TrainConfig(out=str(out), report_to="tensorboard", **TINY).validate(), **QUIET)
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    names = {"objective/scores": "reward_mean", "objective/kl": "kl_mean", "policy/entropy_avg": "entropy",
             "policy/clipfrac_avg": "clipfrac", "loss/policy_avg": "policy_loss", "loss/value_avg": "value_loss",
             "policy/approxkl_avg": "approx_kl", "objective/rlhf_reward": "rlhf_reward",
             "task_score_mean": "task_score_mean"}
    assert set(names) <= tags, sorted(tags)
    for tag, key in names.items():
        events = acc.Scalars(tag)
        assert [e.step for e in events] == [0, 1]
        assert [e.value for e in events] == pytest.approx([m[key] for m in metrics], rel=1e-6, abs=1e-6)
    assert _metrics(out) == metrics   # JSONL stays, with fastppo's own names


def test_wandb_is_offline_or_a_clear_error(tmp_path, monkeypatch):
    cfg = TrainConfig(out=str(tmp_path / "run"), report_to="wandb", **TINY)
    if importlib.util.find_spec("wandb") is None:
        with pytest.raises(ValueError, match=r"report_to.*pip install 'fastppo\[wandb\]'"):
            cfg.validate()
        return
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    run(cfg.validate(), **QUIET)
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*"))


def test_lora_shares_the_base_weights_and_saves_only_the_adapter(tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    cfg = TrainConfig(out=str(out), lora_r=4, lora_alpha=8, lora_targets="q_proj,v_proj", **TINY).validate()
    trainer = PPOTrainer.from_config(cfg, **QUIET)
    assert isinstance(trainer.policy, PeftModel) and trainer.ref is None
    # one model in memory: the trainable parameters are the adapter's, everything else is the frozen base
    trainable = [n for n, p in trainer.policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert {id(p) for p in trainer.policy_params} == {id(p) for n, p in trainer.policy.named_parameters()
                                                       if p.requires_grad}
    metrics = trainer.train()
    assert len(metrics) == 2
    ckpt = checkpoint.latest(out)
    files = sorted(p.name for p in (ckpt / "policy").iterdir())
    assert "adapter_model.safetensors" in files and "model.safetensors" not in files
    adapter = load_file(ckpt / "policy" / "adapter_model.safetensors")
    assert adapter and all("lora_" in k for k in adapter)
    # the reference (adapter disabled) is exactly the base written once to frozen/ref, which training left alone
    base = AutoModelForCausalLM.from_pretrained(out / "frozen" / "ref")
    base_sd = base.state_dict()
    for name, p in trainer.policy.get_base_model().named_parameters():
        if "lora_" not in name:
            assert torch.equal(p, base_sd[name.replace(".base_layer", "")]), name
    ro = trainer.rollout(torch.Generator().manual_seed(0))
    from fastppo.trainer.rollout import response_logprobs

    assert torch.equal(ro.ref_logprobs, response_logprobs(base, ro, cfg.temperature))
    assert not torch.equal(ro.old_logprobs, ro.ref_logprobs)
    # resume: base from frozen/, adapter from the checkpoint
    resumed = run(TrainConfig(resume=str(out), iterations=3, progress=False).validate(), log=lambda *_: None,
                  explicit={"resume", "iterations", "progress"})
    assert len(resumed) == 3 and "adapter_model.safetensors" in {
        p.name for p in (checkpoint.latest(out) / "policy").iterdir()}


REWARD_MODULE = '''
CALLS = []

def words(prompts, completions, completion_ids, **kw):
    CALLS.append((list(prompts), list(completions), [list(c) for c in completion_ids]))
    return [float(len(c.split())) for c in completions]

def ends(prompts, completions, **kw):
    return [1.0 if c.endswith("</s>") else 0.0 for c in completions]
'''


@pytest.fixture
def reward_module(tmp_path, monkeypatch):
    name = f"fastppo_test_rewards_{tmp_path.name}"
    (tmp_path / f"{name}.py").write_text(REWARD_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def test_python_reward_functions_drive_a_demo_run(tmp_path, reward_module):
    cfg = TrainConfig(out=str(tmp_path / "run"), reward_funcs=[f"{reward_module}:words", f"{reward_module}:ends"],
                      reward_weights=[2.0, -0.5], **TINY).validate()
    trainer = PPOTrainer.from_config(cfg, **QUIET)
    ro = trainer.rollout(torch.Generator().manual_seed(0))
    calls = sys.modules[reward_module].CALLS
    prompts, completions, ids = calls[-1]
    assert len(completions) == cfg.batch_size and all(p.startswith("<s> Q item") for p in prompts)
    assert ids == [[int(t) for t, m in zip(r, k) if m] for r, k in zip(ro.response.tolist(), ro.mask.tolist())]
    with torch.no_grad():
        rm = trainer.reward_model(input_ids=ro.sequences, attention_mask=ro.attention_mask).logits[:, 0]
    funcs = torch.tensor([2.0 * len(c.split()) - 0.5 * c.endswith("</s>") for c in completions])
    torch.testing.assert_close(ro.scores, rm + funcs)   # reward model + weighted functions
    assert len(trainer.train()) == 2


def test_reward_function_errors(tmp_path, reward_module):
    with pytest.raises(ValueError, match="--reward_funcs.*not module:function"):
        TrainConfig(reward_funcs=["nocolon"]).validate()
    with pytest.raises(ValueError, match="--reward_weights.*one weight per"):
        TrainConfig(reward_funcs=["a:b"], reward_weights=[1.0, 2.0]).validate()
    for spec, why in ((f"{reward_module}:nope", "has no attribute"), ("no_such_mod_xyz:f", "cannot import"),
                      (f"{reward_module}:CALLS", "not callable")):
        cfg = TrainConfig(out=str(tmp_path / "r"), reward_funcs=[spec], **TINY).validate()
        with pytest.raises(ValueError, match=why):
            PPOTrainer.from_config(cfg, **QUIET)
        assert not (tmp_path / "r").exists()   # refused before any model was built


def _real_args(tmp_path, prompts, *extra):
    return ["--policy", str(tmp_path / "policy"), "--prompts", str(prompts), "--out", str(tmp_path / "run"),
            "--iterations", "1", "--batch_size", "4", "--minibatches", "1", "--ppo_epochs", "1", "--max_new_tokens",
            "3", "--progress", "false", "--backend", "torch", "--mode", "grpo", "--group_size", "2", *extra]


@pytest.mark.parametrize("kind", ["save_to_disk", "parquet"])
def test_dataset_prompts_drive_a_run(tmp_path, reward_module, kind):
    import datasets
    _save_tiny_hf_models(tmp_path)
    questions = ["what is the capital of france ?", "is rome the capital ?", "what is rome ?"]
    ds = datasets.Dataset.from_dict({"question": questions, "id": [1, 2, 3]})
    if kind == "parquet":
        src = tmp_path / "q.parquet"
        ds.to_parquet(str(src))
    else:
        src = tmp_path / "q_ds"
        datasets.DatasetDict({"train": ds}).save_to_disk(str(src))
    args = _real_args(tmp_path, src, "--prompts_column", "question", "--reward_funcs", f"{reward_module}:words")
    assert main(args) == 0
    calls = sys.modules[reward_module].CALLS
    assert calls and all(p in questions for prompts, _, _ in calls for p in prompts)
    m = _metrics(tmp_path / "run")[0]
    assert m["reward_mean"] == pytest.approx(sum(len(c.split()) for c in calls[-1][1]) / 4)
    bad = _real_args(tmp_path, src, "--prompts_column", "text", "--reward_funcs", f"{reward_module}:words")
    assert main(bad) == 2


def test_prompt_file_errors_name_the_line(tmp_path, capsys):
    from fastppo.trainer.data import load_prompts

    f = tmp_path / "p.jsonl"
    cases = [('{"prompt": "a"}\n{"prompt": "b"\n', r"p.jsonl:2: not valid JSON"),
             ('{"prompt": "a"}\n\n["x"]\n', r"p.jsonl:3: expected a JSON object"),
             ('{"text": "a"}\n', r"p.jsonl:1: no 'prompt' field \(fields: \['text'\]\)"),
             ('{"prompt": 3}\n', r"p.jsonl:1: 'prompt' must be a string"),
             ('{"prompt": "  "}\n', r"p.jsonl:1: 'prompt' is empty"),
             ("\n\n", r"holds no prompts")]
    for text, msg in cases:
        f.write_text(text)
        with pytest.raises(ValueError, match=msg):
            load_prompts(str(f))
    (tmp_path / "q.jsonl").write_text('{"q": "x", "other": 1}\n')
    assert load_prompts(str(tmp_path / "q.jsonl"), column="q") == ["x"]
    with pytest.raises(ValueError, match="no such file"):
        load_prompts(str(tmp_path / "missing.jsonl"))
    (tmp_path / "p.txt").write_text("hi")
    with pytest.raises(ValueError, match="unknown file type"):
        load_prompts(str(tmp_path / "p.txt"))
    # through the CLI: a clear one-line error, exit status 2, no model built
    _save_tiny_hf_models(tmp_path)
    f.write_text('{"prompt": "a"}\nnot json\n')
    assert main(_real_args(tmp_path, f, "--reward", str(tmp_path / "rm"))) == 2
    assert "p.jsonl:2: not valid JSON" in capsys.readouterr().err


def test_a_missing_local_model_is_an_error_never_a_hub_request(tmp_path, monkeypatch, capsys):
    import socket

    attempts = []

    def no_network(*a, **k):
        attempts.append(a)
        raise OSError("network disabled by the test")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    (tmp_path / "p.jsonl").write_text('{"prompt": "a"}\n')
    for name in ("./models/missing-policy", "some-org/some-model", str(tmp_path / "nope")):
        args = ["--policy", name, "--reward", str(tmp_path), "--prompts", str(tmp_path / "p.jsonl"),
                "--out", str(tmp_path / "run")]
        assert main(args) == 2
        err = capsys.readouterr().err
        assert f"--policy='{name}': no such folder" in err and "never a hub id" in err
    assert main(["--policy", str(tmp_path), "--reward", "org/rm", "--prompts", str(tmp_path / "p.jsonl")]) == 2
    assert "--reward='org/rm': no such folder" in capsys.readouterr().err
    assert attempts == [] and not (tmp_path / "run").exists()


@pytest.mark.parametrize("flag,value,why", [
    ("vf_clip", "0", "must be > 0"), ("clip_high", "-0.5", "must be >= 0"), ("kl_target", "0", "must be > 0"),
    ("temperature", "inf", "must be finite"), ("lr", "nan", "must be finite"), ("kl_horizon", "0", "must be > 0"),
    ("log_every", "0", "must be >= 1"), ("lora_dropout", "1", r"must be in \[0, 1\)"),
    ("report_to", "mlflow", "must be none, tensorboard, wandb"), ("seed", "-1", "must be >= 0"),
    ("device", "tpu", "must be auto, cpu or cuda"), ("gamma", "1.5", r"must be in \[0, 1\]"),
])
def test_every_flag_is_validated_before_any_model_is_built(tmp_path, capsys, flag, value, why):
    assert main(["--out", str(tmp_path / "run"), f"--{flag}", value]) == 2
    err = capsys.readouterr().err
    assert f"--{flag}" in err
    import re

    assert re.search(why, err), err
    assert not (tmp_path / "run").exists()


def test_phases_are_announced_with_their_time_and_progress_is_plain_off_a_terminal(tmp_path):
    logs = []
    cfg = TrainConfig(out=str(tmp_path / "run"), **{**TINY, "iterations": 3, "progress": True, "log_every": 2})
    run(cfg.validate(), log=logs.append)
    text = "\n".join(logs)
    for start in ("[reward model: 3 Bradley-Terry steps] ...", "[warm-up: 3 supervised steps",
                  "[ppo: iterations 0..3]"):
        assert start in text
    assert sum("] done in " in line for line in logs) == 3
    assert [line.split()[1] for line in logs if line.startswith("iteration ")] == ["2/3", "3/3"]
    assert "s/it" in text and "reward_mean=" in text


def test_evaluate_changes_nothing(tmp_path):
    trainer = PPOTrainer.from_config(TrainConfig(out=str(tmp_path / "run"), **TINY).validate(), **QUIET)
    before = [p.detach().clone() for p in trainer.policy.parameters()]
    a, b = trainer.evaluate(batches=2), trainer.evaluate(batches=2)
    assert a == b and set(a) == {"reward_mean", "kl_mean", "response_length", "task_score_mean"}
    assert 0 <= a["task_score_mean"] <= 1 and trainer.iteration == 0
    assert all(torch.equal(x, y) for x, y in zip(before, trainer.policy.parameters()))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_nan_loss_skips_the_step_and_leaves_the_weights_unchanged(tmp_path, backend):
    """A NaN old log-prob at one unmasked token: the fused loss must be NaN (as the float64 formula is), so
    the step is skipped and neither the weights nor the optimiser state move."""
    cfg = TrainConfig(out=str(tmp_path / "run"), **{**TINY, "backend": backend}).validate()
    trainer = PPOTrainer.from_config(cfg, **QUIET)
    with backend_scope(cfg.backend):     # as train_iteration runs it
        assert fastppo.backend.backend_for(torch.zeros(1)) == backend
        ro = trainer.rollout(torch.Generator().manual_seed(0))
        adv = torch.randn(ro.mask.shape, generator=torch.Generator().manual_seed(1))
        b, t = ro.mask.nonzero()[0].tolist()
        ro.old_logprobs[b, t] = float("nan")
        before = [p.detach().clone() for p in trainer.policy.parameters()]
        with pytest.warns(UserWarning, match="non-finite"):
            assert trainer._policy_step(ro, adv) == {}
    assert trainer.skipped_steps == 1
    assert all(torch.equal(x, y) for x, y in zip(before, trainer.policy.parameters()))
    assert trainer.policy_opt.state_dict()["state"] == {}


def test_policy_loss_variants_from_the_command_line(tmp_path, monkeypatch, capsys):
    import fastppo.trainer.update as ppo_mod

    seen = []
    real = ppo_mod.fused_linear_ppo_loss

    def spy(*a, **kw):
        seen.append({k: kw[k] for k in ("policy_loss", "entropy_quantile", "sapo_tau_pos", "ratio_max")})
        return real(*a, **kw)

    monkeypatch.setattr(ppo_mod, "fused_linear_ppo_loss", spy)
    out = tmp_path / "run"
    args = ["--out", str(out), "--iterations", "1", "--batch_size", "8", "--minibatches", "2", "--ppo_epochs", "1",
            "--sft_steps", "2", "--reward_steps", "2", "--progress", "false", "--backend", "torch", "--mode", "grpo",
            "--group_size", "4", "--policy-loss", "gspo", "--entropy-quantile", "0.5"]
    assert main(args) == 0
    assert seen and all(s == {"policy_loss": "gspo", "entropy_quantile": 0.5, "sapo_tau_pos": 1.0,
                              "ratio_max": None} for s in seen)
    assert checkpoint.load_config(checkpoint.latest(out))["policy_loss"] == "gspo"
    capsys.readouterr()
    for flag, value, why in (("--policy-loss", "reinforce", "policy_loss must be one of"),
                             ("--ratio_max", "0.5", "ratio_max must be > 1"),
                             ("--entropy_quantile", "0", r"entropy_quantile must be in \(0, 1\]")):
        assert main(["--out", str(tmp_path / "bad"), flag, value]) == 2
        import re

        assert re.search("--" + why, capsys.readouterr().err)
