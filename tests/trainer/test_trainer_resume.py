"""Safe, faithful resume: no code from a checkpoint, the saved configuration restored, crash-safe rotation,
a torn metrics line, stale temporaries, tokenizer and frozen models saved once."""

import dataclasses
import json
import os
import shutil

import pytest
import torch

from fastppo.trainer import checkpoint
from fastppo.trainer.cli import main, run
from fastppo.trainer.config import TrainConfig, merge_for_resume
from fastppo.trainer.reporting import read_metrics
from tests.trainer.test_trainer import _one_thread_and_backend_untouched  # noqa: F401  (autouse fixture)

TINY = dict(iterations=2, batch_size=8, minibatches=2, ppo_epochs=1, sft_steps=3, reward_steps=3, save_every=1,
            progress=False, backend="torch")  # the Triton path: test_demo_ppo_end_to_end[triton], NaN test
QUIET = dict(log=lambda *_: None)




class _Payload:
    """Unpickling this runs a shell command (what a tampered trainer_state.pt would do)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _fake_checkpoint(root, state, config=None):
    ckpt = root / "checkpoint-000001"
    ckpt.mkdir(parents=True)
    torch.save(state, ckpt / "trainer_state.pt")
    cfg = config or dataclasses.asdict(TrainConfig(out=str(root), **TINY).validate())
    (ckpt / "config.json").write_text(json.dumps(cfg))
    return ckpt


def test_resume_refuses_a_checkpoint_that_holds_code(tmp_path, capsys):
    marker = tmp_path / "pwned"
    run_dir = tmp_path / "run"
    _fake_checkpoint(run_dir, {"iteration": 1, "skipped_steps": 0, "evil": _Payload(marker)})
    # the payload is real: a plain unpickle runs it
    torch.load(run_dir / "checkpoint-000001" / "trainer_state.pt", weights_only=False)
    assert marker.exists()
    marker.unlink()
    with pytest.raises(ValueError, match="refusing to load"):
        checkpoint.load_state(run_dir / "checkpoint-000001")
    assert main(["--resume", str(run_dir), "--iterations", "3", "--progress", "false"]) == 2
    assert "refusing to load" in capsys.readouterr().err
    assert not marker.exists()
    assert not (run_dir / "frozen").exists()   # refused before any model was built


def test_resume_restores_the_saved_configuration(tmp_path):
    a = tmp_path / "a"
    run(TrainConfig(out=str(a), mode="grpo", group_size=4, kl_coef=0.05, **TINY).validate(), **QUIET)
    saved = checkpoint.load_config(checkpoint.latest(a))
    assert saved["mode"] == "grpo" and saved["kl_kind"] == "low_var_kl"
    logs = []
    # resumed without --mode: continues as GRPO (no critic), in the same folder, with a logged override
    metrics = run(TrainConfig(resume=str(a), iterations=3, progress=False).validate(), log=logs.append,
                  explicit={"resume", "iterations", "progress"})
    assert [m["iteration"] for m in metrics] == [0, 1, 2]
    assert "value_loss" not in metrics[-1]
    assert checkpoint.load_config(checkpoint.latest(a))["mode"] == "grpo"
    assert any("overriding iterations=2 with 3" in line for line in logs)
    assert [p.name for p in checkpoint.list_checkpoints(a)] == ["checkpoint-000002", "checkpoint-000003"]
    # a contradicting flag is an error naming the flag, before any model is built
    for flag, value in (("mode", "ppo"), ("kl_coef", 0.1), ("batch_size", 16), ("seed", 5)):
        cfg = TrainConfig(resume=str(a), iterations=4, **{flag: value})
        with pytest.raises(ValueError, match=f"--{flag}=.*contradicts the resumed run"):
            merge_for_resume(cfg.validate(), saved, {"resume", "iterations", flag}, "ckpt")
    assert main(["--resume", str(a), "--iterations", "4", "--mode", "ppo"]) == 2


def test_tokenizer_saved_and_frozen_models_saved_once(tmp_path):
    from tests.trainer.test_trainer import _save_tiny_hf_models

    _save_tiny_hf_models(tmp_path)
    args = ["--policy", str(tmp_path / "policy"), "--reward", str(tmp_path / "rm"), "--prompts",
            str(tmp_path / "prompts.jsonl"), "--out", str(tmp_path / "run"), "--iterations", "1", "--batch_size", "4",
            "--minibatches", "1", "--ppo_epochs", "1", "--max_new_tokens", "3", "--progress", "false",
            "--backend", "torch"]
    assert main(args) == 0
    ckpt = checkpoint.latest(tmp_path / "run")
    assert (ckpt / "policy" / "tokenizer_config.json").exists()
    assert not (ckpt / "ref").exists() and not (ckpt / "reward").exists()
    # the demo: the trained reward model and the reference are written once, outside the checkpoints
    out = tmp_path / "demo"
    run(TrainConfig(out=str(out), **{**TINY, "iterations": 3}).validate(), **QUIET)
    assert sorted(p.name for p in (out / "frozen").iterdir()) == ["ref", "reward"]
    for ckpt in checkpoint.list_checkpoints(out):
        assert sorted(p.name for p in ckpt.iterdir()) == ["config.json", "critic", "policy", "trainer_state.pt"]


def _tiny_model():
    from transformers import LlamaForCausalLM

    from fastppo.trainer.demo import tiny_llama_config

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config())


class _Crash(Exception):
    pass


def test_a_crash_at_any_step_of_saving_leaves_a_complete_checkpoint(tmp_path, monkeypatch):
    """Simulate a kill before each filesystem step of checkpoint.save (writing, renaming into place, each
    rename-before-delete and each delete, a delete cut half-way): after every crash, a restart cleans the
    leftovers and finds the newest complete checkpoint, and the next save succeeds."""
    model = _tiny_model()
    real = {"replace": os.replace, "rmtree": shutil.rmtree, "save": torch.save}
    k = 0
    while True:
        root = tmp_path / f"case{k}"
        for it in (1, 2, 3):
            checkpoint.save(root, it, {"policy": model}, {"iteration": it}, {"it": it}, keep=2)
        calls = {"n": 0}

        def step(name, calls=calls, k=k):
            calls["n"] += 1
            if calls["n"] == k + 1:
                raise _Crash(name)

        def replace(a, b):
            step("replace")
            real["replace"](a, b)

        def rmtree(path, *a, calls=calls, k=k, **kw):
            calls["n"] += 1
            if calls["n"] == k + 1:   # killed half-way through the delete
                files = sorted(p for p in path.rglob("*") if p.is_file())
                files[0].unlink()
                raise _Crash("rmtree")
            real["rmtree"](path, *a, **kw)

        def save(obj, f):
            step("torch.save")
            real["save"](obj, f)

        monkeypatch.setattr(checkpoint.os, "replace", replace)
        monkeypatch.setattr(checkpoint.shutil, "rmtree", rmtree)
        monkeypatch.setattr(checkpoint.torch, "save", save)
        crashed = False
        try:
            checkpoint.save(root, 4, {"policy": model}, {"iteration": 4}, {"it": 4}, keep=2)
        except _Crash:
            crashed = True
        monkeypatch.undo()
        checkpoint.clean_stale(root)
        assert not [p for p in root.iterdir() if p.name.startswith(".")]
        ckpt = checkpoint.latest(root)
        it = checkpoint.load_state(ckpt)["iteration"]
        assert it in (3, 4)
        assert checkpoint.load_config(ckpt) == {"it": it}
        from safetensors.torch import load_file

        assert set(load_file(ckpt / "policy" / "model.safetensors")) == set(model.state_dict())
        for p in checkpoint.list_checkpoints(root):   # every checkpoint-N left is complete
            assert (p / "trainer_state.pt").is_file() and (p / "policy" / "model.safetensors").is_file()
        checkpoint.save(root, 5, {"policy": model}, {"iteration": 5}, {"it": 5}, keep=2)
        assert [p.name for p in checkpoint.list_checkpoints(root)][-1] == "checkpoint-000005"
        if not crashed:
            break
        k += 1
    assert k == 4   # crashed at: torch.save, rename into place, rename-before-delete, delete of checkpoint-2


def test_metrics_tolerate_a_torn_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"iteration": 0, "reward_mean": 1.0}\n{"iteration": 1, "reward_mean": 2.0}\n{"iterat')
    with pytest.warns(UserWarning, match="torn last line"):
        assert [m["iteration"] for m in read_metrics(path)] == [0, 1]
    path.write_text('{"iteration": 0}\n{"iterat\n{"iteration": 2}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2"):
        read_metrics(path)


def test_resume_after_a_crash_mid_write(tmp_path):
    """A run killed while appending to metrics.jsonl and while writing a checkpoint resumes cleanly."""
    out = tmp_path / "run"
    run(TrainConfig(out=str(out), **TINY).validate(), **QUIET)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"iteration": 2, "reward_me')
    (out / ".tmp-checkpoint-000003-999").mkdir()
    (out / ".old-checkpoint-000001-999").mkdir()
    logs = []
    with pytest.warns(UserWarning, match="torn last line"):
        metrics = run(TrainConfig(out=str(out), resume=str(out), **{**TINY, "iterations": 3}).validate(),
                      log=logs.append)
    assert [m["iteration"] for m in metrics] == [0, 1, 2]
    assert [m["iteration"] for m in read_metrics(out / "metrics.jsonl")] == [0, 1, 2]
    assert not [p for p in out.iterdir() if p.name.startswith((".tmp-", ".old-"))]
    assert any("removed .tmp-checkpoint-000003-999" in line for line in logs)
