"""fastppo.hf.causal_lm_logprobs on an FSDP2-wrapped (torch.distributed.fsdp.fully_shard) tiny Llama,
1 and 2 gloo processes on CPU: the same log-probs and entropy as the unwrapped model, and the
gradients FSDP2 reduce-scatters equal the mean over ranks of the unwrapped model's gradients."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist

from tests.ops.test_distributed import run_ranks

pytestmark = pytest.mark.slow   # multi-process end to end: `python -m pytest -q -m slow`


def _tiny_llama(tie):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                      tie_word_embeddings=tie)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg)


def _inputs(rank):
    gen = torch.Generator().manual_seed(100 + rank)
    ids = torch.randint(0, 97, (2, 7), generator=gen)
    attn = torch.ones_like(ids)
    attn[1, -2:] = 0
    return ids, attn


def _fsdp_worker(rank, world, per_layer, tie):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from fastppo.hf import causal_lm_logprobs, reference_causal_lm_logprobs

    plain = _tiny_llama(tie)
    model = copy.deepcopy(plain)
    mesh = init_device_mesh("cpu", (world,))
    if per_layer:
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)

    ids, attn = _inputs(rank)
    g = torch.randn(ids.shape[0], ids.shape[1] - 1, generator=torch.Generator().manual_seed(5 + rank))
    lp, ent = causal_lm_logprobs(model, ids, attn, return_entropy=True)
    (lp * g + 0.1 * ent).sum().backward()

    keep = attn[:, 1:] == 1
    want = reference_causal_lm_logprobs(plain, ids, attn)
    torch.testing.assert_close(lp[keep], want[keep], rtol=1e-5, atol=1e-5)
    # the mean over ranks of the unwrapped model's gradient (FSDP2 averages by default)
    for r in range(world):
        ids_r, attn_r = _inputs(r)
        g_r = torch.randn(ids_r.shape[0], ids_r.shape[1] - 1, generator=torch.Generator().manual_seed(5 + r))
        lp_r, ent_r = causal_lm_logprobs(plain, ids_r, attn_r, return_entropy=True)
        if r == rank:
            torch.testing.assert_close(lp, lp_r, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(ent, ent_r, rtol=1e-5, atol=1e-6)
        ((lp_r * g_r + 0.1 * ent_r).sum() / world).backward()
    named = dict(plain.named_parameters())
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name}: FSDP2 produced no gradient"
        torch.testing.assert_close(p.grad.full_tensor(), named[name].grad, rtol=1e-5, atol=1e-6, msg=name)
    dist.barrier()


def test_fsdp2_one_process_root_only():
    run_ranks(_fsdp_worker, False, False, world=1)


def test_fsdp2_two_processes_per_layer_and_root():
    run_ranks(_fsdp_worker, True, True, world=2)
