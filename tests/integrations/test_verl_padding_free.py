"""verl's padding-free path (use_remove_padding=True) inside verl 0.9.1's own actor engine on CPU, patched vs
unpatched. verl 0.9.1 has no DataParallelPPOActor (workers/actor/dp_actor.py is gone); its actor is the engine
`verl.workers.engine.fsdp.transformer_impl.FSDPEngineWithLMHead`, whose `forward_step` is what compute_log_prob
(forward only, per micro-batch) and update_policy (with verl's `ppo_loss`, then backward) run. Here it runs with a
tiny Qwen2 built from a config: `prepare_model_inputs` packs the micro-batch to one [1, total_nnz] row with
position ids (no attention mask; transformers' sdpa mask separates the packed sequences by their position ids),
`prepare_model_outputs` calls `logprobs_from_logits` and `entropy_from_logits` (or the chunked one) on
[total_nnz, V], and with use_fused_kernels verl's patched model forward calls `FusedLinearForPPO` on hidden
states [1, total_nnz, H]. patch("verl") must serve every one of those calls (h.stats: nothing delegated) with
verl's numbers: log-probs, entropy, loss, and every parameter's gradient.

What could not run on CPU, and the stand-ins: verl has no CPU platform (its device helpers fall back to CUDA), so
`get_device_name` / `get_device_id` in transformer_impl are replaced by "cpu"; `initialize()` (FSDP wrapping,
optimizer) is not called — `engine.module` is the plain model and `_autocast_dtype` float32, what
`_build_fsdp_module` sets for an fp32 param dtype; torch.distributed is a one-process gloo group; flash-attn's
varlen kernels (CUDA) are not used: verl's remove-padding attention patch is for flash_attention_2 models, and
this model uses sdpa. Ulysses sequence parallel (sp > 1) and `forward_backward_batch`'s micro-batch split are not
exercised."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.distributed as dist
import verl.utils.tensordict_utils as tu
import verl.workers.engine.fsdp.transformer_impl as ti
from transformers import AutoModelForCausalLM, Qwen2Config
from verl.trainer.config.config import CheckpointConfig
from verl.workers.config import ActorConfig, FSDPEngineConfig, FSDPOptimizerConfig, HFModelConfig, PolicyLossConfig
from verl.workers.utils.losses import ppo_loss

import fastppo.integrations as fi

pytestmark = pytest.mark.usefixtures("verl_torch_paths")

V = 96
PROMPTS, RESPONSES = [3, 2, 4], [4, 5, 2]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A one-process gloo group, a tiny Qwen2 saved where HFModelConfig reads it, verl's device helpers on CPU."""
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    cfg = Qwen2Config(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=torch.float32)
    path = tmp_path_factory.mktemp("tiny_qwen2")
    model.save_pretrained(path)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ti, "get_device_name", lambda: "cpu")
        mp.setattr(ti, "get_device_id", lambda: "cpu")
        yield model, str(path)
    if created:
        dist.destroy_process_group()


def _engine(path, model, chunked):
    engine_cfg = FSDPEngineConfig(use_torch_compile=False, entropy_from_logits_with_chunking=chunked,
                                  entropy_from_logits_chunk_size=5)
    engine = ti.FSDPEngineWithLMHead(HFModelConfig(path=path, use_remove_padding=True), engine_cfg,
                                     FSDPOptimizerConfig(lr=1e-3), CheckpointConfig())
    engine.module = model
    engine._autocast_dtype = torch.float32
    return engine


def _micro_batch(fused, temperature):
    g = torch.Generator().manual_seed(1)
    nested = functools.partial(torch.nested.nested_tensor, layout=torch.jagged)
    prompts = [torch.randint(0, V, (p,), generator=g) for p in PROMPTS]
    responses = [torch.randint(0, V, (r,), generator=g) for r in RESPONSES]
    masks = [torch.ones(r) for r in RESPONSES]
    masks[1][2] = 0.0                                                   # a hole in a response
    tensors = {
        "input_ids": nested([torch.cat(x) for x in zip(prompts, responses)]),
        "position_ids": nested([torch.arange(p + r) for p, r in zip(PROMPTS, RESPONSES)]),
        "prompts": nested(prompts), "responses": nested(responses), "response_mask": nested(masks),
        "old_log_probs": nested([torch.randn(r, generator=g) * 0.1 - 4.5 for r in RESPONSES]),
        "advantages": nested([torch.randn(r, generator=g) for r in RESPONSES]),
    }
    return tu.get_tensordict(tensors, {"use_remove_padding": True, "use_fused_kernels": fused,
                                       "calculate_entropy": True, "temperature": temperature, "dp_size": 1,
                                       "batch_num_tokens": None, "global_batch_size": None})


def _loss():
    cfg = ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, clip_ratio=0.2,
                      entropy_coeff=0.01, use_kl_loss=False, loss_agg_mode="token-mean",
                      policy_loss=PolicyLossConfig(loss_mode="vanilla"))
    return functools.partial(ppo_loss, cfg)


def _step(model, path, *, fused, chunked, train, temperature):
    """verl's forward_step on one packed micro-batch: (log-probs, entropy, loss, parameter gradients)."""
    engine = _engine(path, model, chunked)
    plain_forward = type(model).forward
    if fused:   # verl's model patch for use_fused_kernels (its class-wide forward, undone below)
        from verl.models.transformers.monkey_patch import patch_forward_with_backends

        patch_forward_with_backends(model, use_fused_kernels=True, fused_kernels_backend="torch")
    model.zero_grad(set_to_none=True)
    try:
        with torch.enable_grad() if train else torch.no_grad():
            loss, out = engine.forward_step(_micro_batch(fused, temperature), forward_only=not train,
                                            loss_function=_loss() if train else None)
            if train:
                loss.backward()
    finally:
        type(model).forward = plain_forward
    grads = [p.grad.clone() for p in model.parameters()] if train else []
    mo = out["model_output"]
    return mo["log_probs"].values(), mo["entropy"].values(), loss.detach(), grads


@pytest.mark.parametrize("fused,chunked", [(False, False), (False, True), (True, False)])
@pytest.mark.parametrize("train", [False, True], ids=["compute_log_prob", "update_policy"])
def test_forward_step_padding_free(setup, fused, chunked, train):
    model, path = setup
    kw = dict(fused=fused, chunked=chunked, train=train, temperature=0.8 if fused else 1.0)
    want = _step(model, path, **kw)
    with fi.patch("verl", ops=["logprobs_from_logits", "entropy_from_logits", "entropy_from_logits_with_chunking",
                               "FusedLinearForPPO", "policy_loss_vanilla"]) as h:
        got = _step(model, path, **kw)
        served = dict(h.stats.served)
        assert not h.stats.delegated
    if fused:
        assert served.get("FusedLinearForPPO") == 1 and "logprobs_from_logits" not in served
    else:
        entropy_fn = "entropy_from_logits_with_chunking" if chunked else "entropy_from_logits"
        assert served.get("logprobs_from_logits") == 1 and served.get(entropy_fn) == 1
    assert served.get("policy_loss_vanilla", 0) == int(train)
    (lp_w, ent_w, loss_w, g_w), (lp_g, ent_g, loss_g, g_g) = want, got
    assert lp_g.shape == lp_w.shape == (sum(PROMPTS) + sum(RESPONSES),)
    torch.testing.assert_close(lp_g, lp_w, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent_g, ent_w, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss_g, loss_w, rtol=1e-5, atol=1e-6)
    assert len(g_g) == len(g_w)
    for a, b in zip(g_g, g_w):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_packed_rows_equal_separate_forwards(setup):
    """The packed row is what verl means: each sequence's log-probs equal a forward of that sequence alone
    (the sdpa mask separates packed sequences by position ids); checked through the patched path."""
    model, path = setup
    with fi.patch("verl", ops=["logprobs_from_logits", "entropy_from_logits"]):
        lp, _, _, _ = _step(model, path, fused=False, chunked=False, train=False, temperature=1.0)
    ids = _micro_batch(False, 1.0)["input_ids"]
    start = 0
    for seq in ids.unbind():
        with torch.no_grad():
            logits = model(input_ids=seq[None]).logits[0]
        alone = torch.log_softmax(logits.float(), -1)[:-1].gather(-1, seq[1:, None])[:, 0]
        torch.testing.assert_close(lp[start:start + len(seq) - 1], alone, rtol=1e-5, atol=1e-5)
        start += len(seq)
