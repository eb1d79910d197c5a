"""Paired CPU timing of the hosts' real entry points, unpatched vs `fastppo.integrations.patch(host)` (issue #25,
CPU speed): TRL 1.16's fused LM head (`trl.trainer.utils._ChunkedLogProbFunction.apply`, what patch("trl")
rebinds), TRL's `entropy_from_logits` and OpenRLHF's `compute_entropy`, forward + backward (upstream gradients not
all ones), fp32, at the hosts' shapes (Qwen-0.5B head: N=256, H=896, V=151936).

Runs are interleaved (A B, B A, ...) after one untimed warm-up of each; the table gives the median wall and process
CPU seconds of each side, their ratio (patched / unpatched: below 1 is faster patched), the peak live bytes of one
extra untimed run of each (fastppo.bench.counters.PeakMemory: storages created inside the call), the threads and
the load average. On a shared, loaded machine the CPU-time ratio is the steadier figure. Not a test: it measures.

    python bench/cpu_hosts.py                       # all cases, 3 pairs
    python bench/cpu_hosts.py --case head --pairs 5 --threads 2
    python bench/cpu_hosts.py --case entropy-trl --entropy-shape 8 256 151936
    python bench/cpu_hosts.py --case grpo-step --pairs 3     # a GRPOTrainer step, Qwen-0.5B head (H, V of --head-shape)
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import statistics
import sys
import tempfile
import time
import types

import torch

import fastppo.integrations as fi
from fastppo.bench.counters import PeakMemory


def openrlhf_utils():
    """openrlhf.models.utils without flash-attn's CUDA extension (its pure-Python submodules are enough to import)."""
    fa = importlib.util.find_spec("flash_attn")
    if fa is not None and "flash_attn" not in sys.modules:
        pkg = types.ModuleType("flash_attn")
        pkg.__path__ = list(fa.submodule_search_locations)
        pkg.__spec__ = fa
        sys.modules["flash_attn"] = pkg
    sys.modules.setdefault("flash_attn.ops.triton.cross_entropy", None)   # its CPU fallback, as without flash-attn
    import openrlhf.models.utils as ou

    return ou


def _head_case(N, H, V):
    import trl.trainer.utils as tu

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, H, generator=g)
    weight = torch.randn(V, H, generator=g) / H ** 0.5
    labels = torch.randint(0, V, (N,), generator=g)
    g_lp, g_ent = torch.randn(N, generator=g), torch.randn(N, generator=g) * 0.1

    def step():
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        lp, ent, *_ = tu._ChunkedLogProbFunction.apply(h, w, None, labels, 1.0, tu._CHUNKED_LOGPROB_CHUNK_SIZE,
                                                       None, 1.0, ("entropy",))
        ((lp * g_lp).sum() + (ent * g_ent).sum()).backward()
        return lp, ent, h.grad, w.grad

    return f"TRL fused head N={N} H={H} V={V}", "trl", step


def _entropy_case(host, shape):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(*shape, generator=g) * 3
    g_ent = torch.randn(shape[:-1], generator=g)
    if host == "trl":
        import trl.trainer.utils as mod
        name = "entropy_from_logits"
    else:
        mod, name = openrlhf_utils(), "compute_entropy"

    def step():
        z = logits.clone().requires_grad_()
        ent = getattr(mod, name)(z)     # looked up at call time: patch() rebinds the module attribute
        (ent * g_ent).sum().backward()
        return ent, z.grad

    return f"{host} {name} {list(shape)}", host, step


def _grpo_step_case(tmp, H, V, completions=8, length=16):
    """One GRPOTrainer training step's loss + backward (`_compute_loss`, what patch("trl") replaces) on a
    one-layer Llama with a Qwen-0.5B-shaped head (hidden H, vocabulary V: a word-level tokenizer of V - 4 words),
    `completions` completions of `length` tokens after 3-word prompts, on one batch of TRL's own
    `_prepare_inputs` (generation and scoring untimed)."""
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from trl import GRPOConfig, GRPOTrainer

    words = [f"w{i}" for i in range(V - 4)]
    tk = Tokenizer(models.WordLevel({t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>", *words])},
                                    unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=V, hidden_size=H, intermediate_size=2 * H, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
                      eos_token_id=2, tie_word_embeddings=False)
    data = Dataset.from_dict({"prompt": [" ".join(words[i:i + 3]) for i in range(0, 48, 3)]})
    args = GRPOConfig(output_dir=str(tmp), per_device_train_batch_size=completions, num_generations=4,
                      max_completion_length=length, report_to=[], use_cpu=True, seed=0, save_strategy="no", beta=0.0,
                      bf16=False, steps_per_generation=1)
    tr = GRPOTrainer(model=LlamaForCausalLM(cfg), reward_funcs=lambda completions, **kw: [float(len(c) % 3)
                                                                                          for c in completions],
                     args=args, train_dataset=data, processing_class=tok)
    tr.model.train()
    tr.current_gradient_accumulation_steps = 1
    inputs = tr._prepare_inputs(next(iter(tr.get_train_dataloader())))
    inputs["old_per_token_logps"] = tr._get_per_token_logps_and_entropies(   # an off-policy step: clipping acts
        tr.model, torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1),
        torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1), inputs["completion_ids"].shape[1])[0].detach()
    inputs["old_per_token_logps"] += 0.1 * torch.randn(inputs["old_per_token_logps"].shape)

    def step():
        tr.model.zero_grad(set_to_none=True)
        loss = tr._compute_loss(tr.model, inputs)
        loss.backward()
        return [loss.detach(), tr.model.lm_head.weight.grad, tr.model.model.embed_tokens.weight.grad]

    n = int(inputs["completion_mask"].sum())
    return f"TRL GRPO step H={H} V={V} {n} tokens", "trl", step


def _timed(step):
    c, w = time.process_time(), time.perf_counter()
    out = step()
    return time.perf_counter() - w, time.process_time() - c, out


def _peak(step):
    with PeakMemory() as pm:
        step()
    return pm.peak


def _max_diff(a, b):
    return max(float((x.double() - y.double()).abs().max()) for x, y in zip(a, b))


def measure(label, host, step, pairs):
    def side(patched):
        return fi.patch(host) if patched else contextlib.nullcontext()

    outs = {}
    for patched in (False, True):   # warm-up (OpenRLHF compiles), outputs kept for the difference column
        with side(patched):
            outs[patched] = [t.detach() for t in step()]
    times = {False: [], True: []}
    for i in range(pairs):
        for patched in ((False, True) if i % 2 == 0 else (True, False)):
            with side(patched):
                wall, cpu, _ = _timed(step)
            times[patched].append((wall, cpu))
    peaks = {}
    for patched in (False, True):
        with side(patched):
            peaks[patched] = _peak(step)
    med = {p: (statistics.median(w for w, _ in t), statistics.median(c for _, c in t)) for p, t in times.items()}
    return dict(label=label, wall=med, peak=peaks, diff=_max_diff(outs[False], outs[True]))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", choices=["all", "head", "entropy-trl", "entropy-openrlhf", "grpo-step"], default="all")
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    ap.add_argument("--head-shape", type=int, nargs=3, default=[256, 896, 151936], metavar=("N", "H", "V"))
    ap.add_argument("--entropy-shape", type=int, nargs=3, default=[2, 256, 151936], metavar=("B", "T", "V"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.pop("TRITON_INTERPRET", None)
    cases = []
    if args.case in ("all", "head"):
        cases.append(_head_case(*args.head_shape))
    if args.case in ("all", "entropy-trl"):
        cases.append(_entropy_case("trl", args.entropy_shape))
    if args.case in ("all", "entropy-openrlhf"):
        cases.append(_entropy_case("openrlhf", args.entropy_shape))
    if args.case in ("all", "grpo-step"):
        cases.append(_grpo_step_case(tempfile.mkdtemp(prefix="fastppo-grpo-"), *args.head_shape[1:]))
    print(f"fp32, torch threads {torch.get_num_threads()}, cpus {os.cpu_count()}, {args.pairs} interleaved pairs, "
          f"load average before {os.getloadavg()[0]:.1f}")
    print(f"{'entry point':48s} {'wall host':>9s} {'wall fp':>8s} {'ratio':>6s} {'cpu host':>9s} {'cpu fp':>7s} "
          f"{'ratio':>6s} {'peak host MB':>12s} {'peak fp MB':>10s} {'max diff':>9s}")
    for label, host, step in cases:
        r = measure(label, host, step, args.pairs)
        (wh, ch), (wf, cf) = r["wall"][False], r["wall"][True]
        print(f"{r['label']:48s} {wh:9.2f} {wf:8.2f} {wf / wh:6.2f} {ch:9.2f} {cf:7.2f} {cf / ch:6.2f} "
              f"{r['peak'][False] / 2**20:12.0f} {r['peak'][True] / 2**20:10.0f} {r['diff']:9.2e}", flush=True)
    print(f"load average after {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
