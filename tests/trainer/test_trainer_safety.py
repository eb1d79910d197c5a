"""No run is ever lost or mixed, and every failure is one clear line with exit status 2: a fresh run refuses a
folder holding a run (or --overwrite replaces it whole), demo checkpoints are loadable models, a missing
prompts path never reaches the network, unloadable model folders, an unwritable --out, a full disk and Ctrl-C.
Dropout is off in every model the trainer runs (unless --keep_dropout)."""

import errno
import os
import pickle
import shutil
import socket

import pytest
import torch

from fastppo.trainer import checkpoint
from fastppo.trainer.cli import main
from tests.trainer.test_trainer import (
    _one_thread_and_backend_untouched,  # noqa: F401  (autouse fixture)
    _save_tiny_hf_models,
)

TINY = ["--iterations", "2", "--batch_size", "8", "--minibatches", "2", "--ppo_epochs", "1", "--sft_steps", "3",
        "--reward_steps", "3", "--save_every", "1", "--progress", "false", "--backend", "torch"]


def _demo(out, *extra):
    return main(["--out", str(out), *TINY, *extra])


def _snapshot(root):
    """Every file under root: relative path -> (size, mtime_ns, bytes)."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(root.rglob("*")) if p.is_file()}


def _one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("fastppo train: "), err
    return lines[0]


def test_a_fresh_run_refuses_a_folder_holding_a_run_and_overwrite_replaces_it_whole(tmp_path, capsys):
    out = tmp_path / "run"
    assert _demo(out) == 0
    (out / "notes.txt").write_text("the user's own file")
    before = _snapshot(out)
    capsys.readouterr()
    assert _demo(out, "--iterations", "1") == 2
    line = _one_line(capsys.readouterr().err)
    assert f"--out {out} already holds a run" in line and f"--resume {out}" in line and "--overwrite" in line
    assert _snapshot(out) == before                      # nothing of the old run changed
    # --overwrite: the old run's files go first (no mixture), the user's own file stays
    frozen_before = (out / "frozen" / "ref" / "model.safetensors").stat().st_mtime_ns
    assert _demo(out, "--iterations", "1", "--overwrite") == 0
    assert [p.name for p in checkpoint.list_checkpoints(out)] == ["checkpoint-000001"]
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
    assert (out / "frozen" / "ref" / "model.safetensors").stat().st_mtime_ns != frozen_before
    assert (out / "notes.txt").read_text() == "the user's own file"
    # --overwrite with --resume of the same folder would delete the run being resumed
    assert main(["--resume", str(out), "--iterations", "2", "--overwrite"]) == 2
    assert "would delete the run being resumed" in capsys.readouterr().err


def test_a_demo_checkpoint_policy_is_a_loadable_model_with_its_tokenizer(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "demo"
    assert _demo(out, "--iterations", "1") == 0
    policy = checkpoint.latest(out) / "policy"
    tok = AutoTokenizer.from_pretrained(str(policy), local_files_only=True)
    ids = tok("<s> Q item3 SEP")["input_ids"]
    assert ids == [1, 3, 9, 4] and tok.decode(ids) == "<s> Q item3 SEP"
    assert AutoModelForCausalLM.from_pretrained(str(policy), local_files_only=True).config.vocab_size == len(tok)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "<s> Q item3 SEP"}\n{"prompt": "<s> Q item5 SEP"}\n')
    args = ["--policy", str(policy), "--reward", str(out / "frozen" / "reward"), "--prompts", str(prompts),
            "--out", str(tmp_path / "again"), *TINY, "--iterations", "1", "--batch_size", "4"]
    assert main(args) == 0
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path / "again")] == ["checkpoint-000001"]


def test_a_missing_prompts_path_is_an_error_without_a_network_request(tmp_path, monkeypatch, capsys):
    connections = []

    def record(*a, **k):
        connections.append(a)
        raise OSError("network disabled by the test")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(socket.socket, "connect", record)
    monkeypatch.setattr(socket, "create_connection", record)
    (tmp_path / "policy").mkdir()
    for name in ("prompts.txt", "data/prompts", str(tmp_path / "missing.jsonl"), "./prompts", "~/nope.parquet"):
        args = ["--policy", str(tmp_path / "policy"), "--reward", str(tmp_path), "--prompts", name,
                "--out", str(tmp_path / "run")]
        assert main(args) == 2
        line = _one_line(capsys.readouterr().err)
        assert f"--prompts {name}: no such file or folder" in line and "hub:owner/name" in line
    assert connections == [] and not (tmp_path / "run").exists()


def test_invalid_utf8_in_a_prompts_file_names_file_and_line(tmp_path):
    from fastppo.trainer.data import load_prompts

    bad = b'{"prompt": "caf\xc3\xa9"}\n{"prompt": "caf\xe9"}\n'
    for name in ("p.jsonl", "p.csv", "p.json"):
        path = tmp_path / name
        path.write_bytes(bad if name != "p.csv" else b"prompt\nok\ncaf\xe9\n")
        line = 3 if name == "p.csv" else 2
        with pytest.raises(ValueError, match=rf"{name}:{line}: not valid UTF-8 \(byte 0xe9 at column"):
            load_prompts(str(path))


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_unloadable_model_folders_exit_2_naming_the_folder(tmp_path, capsys):
    _save_tiny_hf_models(tmp_path)
    marker = tmp_path / "pwned"
    weights = "model.safetensors"
    cases = {}
    for kind in ("truncated", "pickle", "pickle_bin"):
        folder = tmp_path / kind
        shutil.copytree(tmp_path / "policy", folder)
        data = (folder / weights).read_bytes()
        if kind == "truncated":
            (folder / weights).write_bytes(data[: len(data) // 2])
        elif kind == "pickle":
            (folder / weights).write_bytes(pickle.dumps(_Payload(marker)))
        else:
            (folder / weights).unlink()
            (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(marker)))
        cases[kind] = folder
    for kind, folder in cases.items():
        args = ["--policy", str(folder), "--reward", str(tmp_path / "rm"), "--prompts", str(tmp_path / "prompts.jsonl"),
                "--out", str(tmp_path / f"run-{kind}"), *TINY]
        assert main(args) == 2, kind
        line = _one_line(capsys.readouterr().err)
        assert f"{folder}: cannot load it as" in line and "re-save or re-download" in line, line
    assert not marker.exists()
    # a resumed demo run whose frozen reference is truncated
    out = tmp_path / "demo"
    assert _demo(out, "--iterations", "1") == 0
    ref = out / "frozen" / "ref" / weights
    ref.write_bytes(ref.read_bytes()[:100])
    capsys.readouterr()
    assert main(["--resume", str(out), "--iterations", "2"]) == 2
    assert f"{out / 'frozen' / 'ref'}: cannot load it as" in _one_line(capsys.readouterr().err)


def test_an_unwritable_out_is_refused_before_any_model_is_built(tmp_path, monkeypatch, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert _demo(a_file) == 2
    assert f"--out {a_file}: is a file, not a folder" in _one_line(capsys.readouterr().err)
    assert _demo(a_file / "run") == 2
    assert f"--out {a_file / 'run'}: cannot write there" in _one_line(capsys.readouterr().err)

    def read_only(self, data):
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(type(tmp_path), "write_bytes", read_only)   # a read-only folder (chmod is moot as root)
    assert _demo(tmp_path / "ro") == 2
    res = capsys.readouterr()
    assert "cannot write there (Permission denied); choose a writable folder" in _one_line(res.err)
    assert "reward model" not in res.out        # refused before the reward model trained


def test_a_full_disk_keeps_the_last_complete_checkpoint(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    real_save = torch.save
    calls = []

    def save(obj, f, *a, **k):
        calls.append(f)
        if len(calls) == 2:   # the second checkpoint's trainer state: the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", save)
    assert _demo(out) == 2
    line = _one_line(capsys.readouterr().err)
    assert "writing checkpoint-000002" in line and "No space left on device" in line
    assert f"the last complete checkpoint is {out / 'checkpoint-000001'}" in line
    assert f"fastppo train --resume {out}" in line
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(("checkpoint", ".tmp", ".old"))) == \
        ["checkpoint-000001"]
    monkeypatch.setattr(torch, "save", real_save)
    assert main(["--resume", str(out)]) == 0
    assert [p.name for p in checkpoint.list_checkpoints(out)] == ["checkpoint-000001", "checkpoint-000002"]


def test_ctrl_c_prints_the_last_checkpoint_and_the_resume_command(tmp_path, monkeypatch, capsys):
    from fastppo.trainer.ppo import PPOTrainer

    real = PPOTrainer.train_iteration

    def interrupted(self):
        if self.iteration == 1:
            raise KeyboardInterrupt
        return real(self)

    monkeypatch.setattr(PPOTrainer, "train_iteration", interrupted)
    out = tmp_path / "run"
    assert _demo(out) == 2
    line = _one_line(capsys.readouterr().err)
    assert f"the last checkpoint is {out / 'checkpoint-000001'}" in line
    assert f"continue with `fastppo train --resume {out}`" in line


def test_dropout_is_off_in_every_model_unless_kept(tmp_path):
    from fastppo.trainer import PPOTrainer, demo
    from fastppo.trainer.config import TrainConfig

    def build(**kw):
        policy, reward, critic = demo.build_models(0)
        for m in (policy, reward, critic):
            m.config.attention_dropout = 0.1
            for layer in m.model.layers:
                layer.self_attn.attention_dropout = 0.1
        cfg = TrainConfig(out=str(tmp_path / "run"), batch_size=8, backend="torch", **kw).validate()
        return PPOTrainer(cfg, policy, prompt_fn=None, eos_id=demo.EOS, pad_id=demo.PAD, reward_model=reward,
                          critic=critic)

    def dropouts(model):
        return ([m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)]
                + [layer.self_attn.attention_dropout for layer in model.model.layers]
                + [model.config.attention_dropout])

    kept = build(keep_dropout=True)
    assert kept.critic.score.__class__ is torch.nn.Linear and kept.critic.dropout.p == 0.1   # HF's default head
    assert set(dropouts(kept.critic)) == {0.1}
    trainer = build()
    for model in (trainer.policy, trainer.ref, trainer.reward_model, trainer.critic):
        assert set(dropouts(model)) == {0.0}
    ids = torch.tensor([[1, 3, 6, 4, 15, 2]])
    trainer.critic.train()
    trainer.policy.train()
    assert torch.equal(trainer.critic(input_ids=ids).logits, trainer.critic(input_ids=ids).logits)
    assert torch.equal(trainer.policy(input_ids=ids).logits, trainer.policy(input_ids=ids).logits)


def test_log_lines_never_run_into_the_progress_bar(monkeypatch):
    """On a terminal the phase lines go through tqdm's external_write_mode: the bar is cleared first."""
    import io
    import sys

    from fastppo.trainer import reporting

    screen = io.StringIO()   # stdout and stderr on one terminal
    monkeypatch.setattr(sys, "stdout", screen)
    monkeypatch.setattr(sys, "stderr", screen)
    monkeypatch.setattr(reporting, "is_terminal", lambda stream=None: True)
    progress = reporting.Progress(3, 0, "fastppo ppo", True, 1)
    log = progress.around(print)
    progress.update({"iteration": 0, "reward_mean": 0.5})
    with reporting.phase("ppo: iterations 0..3", log):
        progress.update({"iteration": 1, "reward_mean": 0.75})
    progress.close()
    lines = screen.getvalue().split("\n")
    for msg in ("[ppo: iterations 0..3] ...", "[ppo: iterations 0..3] done in"):
        (line,) = [line for line in lines if msg in line]
        assert line.split("\r")[-1].startswith(msg), repr(line)
