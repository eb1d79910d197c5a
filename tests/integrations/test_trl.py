"""fastppo.integrations.patch("trl") inside the real TRL: GRPOTrainer steps patched vs unpatched
(TRL 1.16 in process, TRL 1.14 in a subprocess with that version first on sys.path), and each
replaced entry point against TRL's original on random inputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import trl

import fastppo.integrations as fi

# .ci/install puts TRL 1.14.0 here (inside the clone, or where FASTPPO_TRL114 says)
TRL114 = os.environ.get("FASTPPO_TRL114", str(Path(__file__).resolve().parents[2] / ".cache" / "trl-1.14.0"))
WORDS = [f"w{i}" for i in range(40)]


def _tokenizer(tmp: Path, words=WORDS):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>", *words])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>")
    tok.save_pretrained(tmp / "tok")   # from disk, as a user would load it (no hub)
    return PreTrainedTokenizerFast.from_pretrained(tmp / "tok")


def _reward(completions, **kwargs):
    """Even-numbered words score: a reward with spread inside each group."""
    return [float(sum(int(w[1:]) % 2 == 0 for w in c.split() if w[1:].isdigit())) for c in completions]


def grpo_trainer(tmp: Path, *, hidden=32, words=WORDS, model_path=False, **config):
    """GRPOTrainer on a tiny Llama built from a config (seeded), vocabulary = the tokenizer's; `config`
    overrides GRPOConfig's arguments below. model_path=True saves the model and passes its path (TRL then
    builds the reference model for beta != 0 from it)."""
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    tok = _tokenizer(tmp, words)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    if model_path:
        model.save_pretrained(tmp / "model")
        model = str(tmp / "model")
    data = Dataset.from_dict({"prompt": [" ".join(WORDS[i:i + 3]) for i in range(0, 36, 3)]})
    kw = dict(output_dir=str(tmp / "out"), per_device_train_batch_size=4, num_generations=2,
              steps_per_generation=3, max_completion_length=5, max_steps=3, learning_rate=5e-2,
              logging_steps=1, report_to=[], use_cpu=True, seed=0, save_strategy="no", beta=0.0, bf16=False)
    kw.update(config)
    return GRPOTrainer(model=model, reward_funcs=_reward, args=GRPOConfig(**kw), train_dataset=data,
                       processing_class=tok)


def grpo_run(patched: bool, tmp: Path, **config) -> dict:
    """A few optimizer steps of GRPOTrainer on a tiny Llama (grpo_trainer); returns per-step loss / grad
    norm, the final parameters and the patch's call counts."""
    handle = fi.patch("trl") if patched else None
    try:
        trainer = grpo_trainer(tmp, **config)
        trainer.train()
    finally:
        stats = None if handle is None else handle.stats
        if handle is not None:
            handle.undo()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return {"loss": [h["loss"] for h in logs], "grad_norm": [h["grad_norm"] for h in logs],
            "params": {k: v.detach().clone() for k, v in trainer.model.state_dict().items()},
            "served": dict(stats.served) if stats else {}, "delegated": dict(stats.delegated) if stats else {}}


def _assert_same_training(a, b):
    assert len(a["loss"]) == len(b["loss"]) == 3
    torch.testing.assert_close(torch.tensor(a["loss"]), torch.tensor(b["loss"]), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(torch.tensor(a["grad_norm"]), torch.tensor(b["grad_norm"]), rtol=1e-4, atol=1e-6)
    for k in a["params"]:
        torch.testing.assert_close(a["params"][k], b["params"][k], rtol=1e-4, atol=1e-5, msg=k)


def test_grpo_trainer_patched_matches_unpatched(tmp_path):
    base = grpo_run(False, tmp_path)
    ours = grpo_run(True, tmp_path)
    _assert_same_training(ours, base)
    assert ours["served"].get("ChunkedLogProbFunction", 0) > 0   # fastppo's linear_logprobs ran (old log-probs)
    assert ours["served"].get("GRPOTrainer._compute_loss", 0) == 3   # and fused_linear_ppo_loss, every step
    assert ours["delegated"] == {}
    assert max(base["grad_norm"]) > 0 and any(x != 0 for x in base["loss"])   # the steps did train


@pytest.mark.slow
def test_grpo_trainer_trl114_patched_matches_unpatched(tmp_path):
    """TRL 1.14's GRPOTrainer on CPU scores tokens with selective_log_softmax(_and_entropy),
    imported by name into grpo_trainer: the patch must reach it there."""
    assert Path(TRL114, "trl").is_dir(), f"TRL 1.14 is not installed at {TRL114}: see .ci/run"
    out = tmp_path / "runs.pt"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([TRL114, str(Path(__file__).resolve().parents[2])]))
    subprocess.run([sys.executable, __file__, str(tmp_path), str(out)], check=True, env=env, timeout=600)
    base, ours = torch.load(out)
    assert ours["version"] == "1.14.0"
    _assert_same_training(ours, base)
    assert ours["served"].get("selective_log_softmax_and_entropy", 0) > 0
    assert ours["delegated"] == {}


if __name__ == "__main__":   # the TRL 1.14 subprocess: python this_file TMP OUT
    os.environ.setdefault("TRITON_INTERPRET", "1")
    tmp, out = Path(sys.argv[1]), sys.argv[2]
    runs = [grpo_run(False, tmp), grpo_run(True, tmp)]
    runs[1]["version"] = trl.__version__
    torch.save(runs, out)
    print(json.dumps({"loss": [r["loss"] for r in runs], "served": runs[1]["served"]}))


def test_fastppo_patch_env_applies_at_import(monkeypatch):
    import importlib

    import trl.trainer.utils as u

    monkeypatch.setenv("FASTPPO_PATCH", "trl")
    sys.modules.pop("fastppo.integrations.auto", None)
    auto = importlib.import_module("fastppo.integrations.auto")
    try:
        assert sorted(auto.HANDLES) == ["trl"]
        assert hasattr(u.selective_log_softmax, "__fastppo_original__")
    finally:
        auto.HANDLES["trl"].undo()
    assert not hasattr(u.selective_log_softmax, "__fastppo_original__")
    with pytest.raises(ValueError, match="target must be one of"):
        fi.patch("deepspeed")


# --- each entry point against TRL's original -------------------------------------------------------

def _fused_head_both(args_fn, outputs, seed_grads):
    import trl.trainer.utils as u

    res = []
    for patched in (False, True):
        h, w, b, t = args_fn()
        ins = [x.clone().requires_grad_() for x in (h, w, b)]
        ctx = fi.patch("trl", ops=["ChunkedLogProbFunction"]) if patched else _Null()
        with ctx as handle:
            out = u._ChunkedLogProbFunction.apply(ins[0], ins[1], ins[2], t, *outputs)
            stats = None if handle is None else handle.stats
        loss = sum((o.float() * g).sum() for o, g in zip(out[:2], seed_grads) if o is not None)
        loss.backward()
        res.append((out, [x.grad for x in ins], stats))
    return res


class _Null:
    def __enter__(self):
        return None

    def __exit__(self, *e):
        return False


ALL = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


@pytest.mark.parametrize("softcap,scale,temperature", [(None, 1.0, 1.0), (30.0, 1.0, 0.7), (5.0, 0.5, 1.3),
                                                       (None, 2.0, 1.0)])
def test_fused_head_matches_trl_chunked_logprob(softcap, scale, temperature):
    """TRL's ChunkedLogProbFunction vs fastppo.linear_logprobs behind it: all five outputs and the
    gradients to hidden, weight and bias, with Gemma-style softcapping and logit_scale."""
    N, H, V = 37, 24, 211

    def args():
        g = torch.Generator().manual_seed(3)
        return (torch.randn(N, H, generator=g), torch.randn(V, H, generator=g) * 0.5,
                torch.randn(V, generator=g) * 0.1, torch.randint(0, V, (N,), generator=g))

    gl, ge = torch.randn(N), torch.randn(N)
    (a, ga, _), (b, gb, st) = _fused_head_both(args, (temperature, 64, softcap, scale, ALL), (gl, ge))
    assert st.served["ChunkedLogProbFunction"] == 1 and st.delegated == {}
    for name, x, y in zip(ALL, b, a):
        assert x.dtype == y.dtype and x.shape == y.shape, name
        if name == "is_top1":
            assert torch.equal(x, y)
        else:
            torch.testing.assert_close(x, y, rtol=2e-5, atol=2e-5, msg=name)
    for x, y in zip(gb, ga):
        torch.testing.assert_close(x, y, rtol=2e-4, atol=2e-5)


def test_fused_head_only_requested_outputs_and_no_bias():
    import trl.trainer.utils as u

    h, w = torch.randn(9, 16, requires_grad=True), torch.randn(50, 16, requires_grad=True)
    t = torch.randint(0, 50, (9,))
    with fi.patch("trl"):
        out = u._ChunkedLogProbFunction.apply(h, w, None, t, 1.0, 4096, None, 1.0, ("log_probs",))
    assert len(out) == 5 and out[0].dtype == torch.float32 and all(o is None for o in out[1:])
    ref = torch.log_softmax((h @ w.t()).double(), -1).gather(-1, t[:, None])[:, 0]
    torch.testing.assert_close(out[0].double(), ref, rtol=1e-5, atol=1e-5)
    out[0].sum().backward()
    assert h.grad is not None and w.grad is not None


def test_fused_head_fp32_hidden_bf16_head():
    """cast_lm_head_to_fp32: fp32 hidden, bf16 weight; TRL computes in hidden's dtype."""
    import trl.trainer.utils as u

    h = torch.randn(11, 16)
    w = (torch.randn(64, 16) * 0.5).to(torch.bfloat16)
    t = torch.randint(0, 64, (11,))
    a = u._ChunkedLogProbFunction.apply(h, w, None, t, 1.0, 4096, None, 1.0, ALL)
    with fi.patch("trl") as handle:
        b = u._ChunkedLogProbFunction.apply(h, w, None, t, 1.0, 4096, None, 1.0, ALL)
    assert handle.stats.served["ChunkedLogProbFunction"] == 1
    for x, y in zip(b[:4], a[:4]):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_selective_log_softmax_family(dtype):
    import trl.trainer.utils as u

    logits = (torch.randn(3, 7, 90) * 3).to(dtype)
    index = torch.randint(0, 90, (3, 7))
    row_mask = torch.rand(3, 7) > 0.3
    row_mask[0] = False
    g = torch.randn(3, 7)
    calls = [("selective_log_softmax", lambda z: (u.selective_log_softmax(z, index, 0.8, row_mask),)),
             ("selective_log_softmax", lambda z: (u.selective_log_softmax(z, index),)),
             ("entropy_from_logits", lambda z: (u.entropy_from_logits(z),)),
             ("selective_log_softmax_and_entropy",
              lambda z: u.selective_log_softmax_and_entropy(z, index, temperature=1.3, row_mask=row_mask))]
    tol = {torch.float32: 2e-5, torch.float64: 1e-10, torch.bfloat16: 5e-2}[dtype]
    for name, call in calls:
        res = []
        for patched in (False, True):
            z = logits.clone().requires_grad_()
            with fi.patch("trl") if patched else _Null() as h:
                outs = call(z)
                if h is not None:
                    assert h.stats.served[name] == 1, name
            sum((o.float() * g).sum() for o in outs).backward()
            res.append((outs, z.grad))
        (a, ga), (b, gb) = res
        for x, y in zip(b, a):
            assert x.dtype == y.dtype, name
            torch.testing.assert_close(x.float(), y.float(), rtol=tol, atol=tol, msg=name)
        torch.testing.assert_close(gb.float(), ga.float(), rtol=tol, atol=tol, msg=name)


def test_top_k_index_delegates_to_trl():
    import trl.trainer.utils as u

    logits, index = torch.randn(2, 5, 30), torch.randint(0, 30, (2, 5, 3))
    with fi.patch("trl") as h:
        out = u.selective_log_softmax(logits, index)
    assert h.stats.delegated["selective_log_softmax"] == 1
    torch.testing.assert_close(out, torch.log_softmax(logits, -1).gather(-1, index))


def test_unsupported_version_is_a_clear_error(monkeypatch):
    import fastppo.integrations.trl as ft

    monkeypatch.setattr(ft, "installed_version", lambda: "1.9.0")
    with pytest.raises(RuntimeError, match=r"trl 1.9.0 is not supported; supported versions: >=1.14"):
        fi.patch("trl")


def test_missing_package_is_a_clear_error(monkeypatch):
    import importlib.metadata

    import fastppo.integrations.trl as ft

    def missing():
        raise importlib.metadata.PackageNotFoundError("trl")

    monkeypatch.setattr(ft, "installed_version", missing)
    with pytest.raises(ImportError, match=r"trl is not installed \(pip install 'fastppo\[trl\]'"):
        fi.patch("trl")
