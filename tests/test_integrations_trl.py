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

trl = pytest.importorskip("trl", reason="pip install fastppo[trl]")

import fastppo.integrations as fi  # noqa: E402

# CI installs TRL 1.14.0 here (.ci/run): pip install --no-deps --target "$FASTPPO_TRL114" trl==1.14.0
TRL114 = os.environ.get("FASTPPO_TRL114", "/tmp/trl114")
WORDS = [f"w{i}" for i in range(40)]


def _tokenizer(tmp: Path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>", *WORDS])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>")
    tok.save_pretrained(tmp / "tok")   # from disk, as a user would load it (no hub)
    return PreTrainedTokenizerFast.from_pretrained(tmp / "tok")


def _reward(completions, **kwargs):
    """Even-numbered words score: a reward with spread inside each group."""
    return [float(sum(int(w[1:]) % 2 == 0 for w in c.split() if w[1:].isdigit())) for c in completions]


def grpo_run(patched: bool, tmp: Path) -> dict:
    """3 optimizer steps of GRPOTrainer on a tiny Llama; returns per-step loss / grad norm, the
    final parameters and the patch's call counts."""
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    tok = _tokenizer(tmp)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    data = Dataset.from_dict({"prompt": [" ".join(WORDS[i:i + 3]) for i in range(0, 36, 3)]})
    args = GRPOConfig(output_dir=str(tmp / "out"), per_device_train_batch_size=4, num_generations=2,
                      steps_per_generation=3, max_completion_length=5, max_steps=3, learning_rate=5e-2,
                      logging_steps=1, report_to=[], use_cpu=True, seed=0, save_strategy="no", beta=0.0, bf16=False)
    handle = fi.patch("trl") if patched else None
    try:
        trainer = GRPOTrainer(model=model, reward_funcs=_reward, args=args, train_dataset=data,
                              processing_class=tok)
        trainer.train()
    finally:
        stats = None if handle is None else handle.stats
        if handle is not None:
            handle.undo()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return {"loss": [h["loss"] for h in logs], "grad_norm": [h["grad_norm"] for h in logs],
            "params": {k: v.detach().clone() for k, v in model.state_dict().items()},
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
    assert ours["served"].get("ChunkedLogProbFunction", 0) > 0   # fastppo's linear_logprobs ran
    assert ours["delegated"] == {}
    assert max(base["grad_norm"]) > 0 and any(x != 0 for x in base["loss"])   # the steps did train


@pytest.mark.skipif(not Path(TRL114, "trl").is_dir(), reason=f"TRL 1.14 not installed at {TRL114} (see .ci/run)")
def test_grpo_trainer_trl114_patched_matches_unpatched(tmp_path):
    """TRL 1.14's GRPOTrainer on CPU scores tokens with selective_log_softmax(_and_entropy),
    imported by name into grpo_trainer: the patch must reach it there."""
    out = tmp_path / "runs.pt"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([TRL114, str(Path(__file__).resolve().parents[1])]))
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
