"""patch("trl") serving GRPOTrainer's whole loss (fastppo/integrations/trl_grpo.py) inside TRL 1.16's real
GRPOTrainer: one training step's loss, gradients and logged metrics patched vs unpatched for every served
configuration (TRL's own `_compute_loss` on one batch from its own `_prepare_inputs`), whole training runs, the
FLOPs of a step, the delegated configurations and the bf16 gradients of the fused head."""

from __future__ import annotations

import contextlib

import pytest
import torch

import fastppo.integrations as fi
from fastppo.integrations import trl_grpo
from tests.integrations.test_trl import grpo_run, grpo_trainer

NAME = trl_grpo.NAME


@pytest.fixture(scope="module")
def step_rig(tmp_path_factory):
    """A GRPOTrainer with a reference model (beta != 0 at build), temperature 0.8, and one batch of its
    `_prepare_inputs`, old / reference log-probs moved off the policy so that clipping, delta and the KL act."""
    tmp = tmp_path_factory.mktemp("grpo")
    tr = grpo_trainer(tmp, beta=0.04, model_path=True, steps_per_generation=2, use_bias_correction_kl=False,
                      temperature=0.8, max_completion_length=6)
    tr.model.train()
    tr.current_gradient_accumulation_steps = 1
    inputs = tr._prepare_inputs(next(iter(tr.get_train_dataloader())))
    g = torch.Generator().manual_seed(1)
    shape = inputs["completion_mask"].shape
    inputs["old_per_token_logps"] = inputs["old_per_token_logps"] + 0.4 * torch.randn(shape, generator=g)
    inputs["ref_per_token_logps"] = inputs["ref_per_token_logps"] + 0.3 * torch.randn(shape, generator=g)
    inputs["completion_mask"][1, 3:] = 0   # a shorter completion
    assert inputs["completion_mask"].sum() > 0 and inputs["advantages"].abs().sum() > 0
    return tr, inputs


# (name, trainer attributes, args attributes, input changes)
CASES = [
    ("grpo_kl_asym", dict(loss_type="grpo", epsilon_high=0.28), {}, {}),
    ("bnpo_delta", dict(loss_type="bnpo", beta=0.0), dict(delta=1.2), {}),
    ("dr_grpo_gspo", dict(loss_type="dr_grpo", importance_sampling_level="sequence"), {}, {}),
    ("dapo_accumulation", dict(loss_type="dapo", current_gradient_accumulation_steps=2), {}, {}),
    ("cispo", dict(loss_type="cispo", epsilon_high=1.3), {}, {}),
    ("sapo", dict(loss_type="sapo"), dict(sapo_temperature_pos=1.2, sapo_temperature_neg=0.9), {}),
    ("grpo_entropy_quantile", dict(loss_type="grpo", top_entropy_quantile=0.5), {}, {}),
    ("bnpo_is_token", dict(loss_type="bnpo", use_vllm=True, vllm_importance_sampling_correction=True), {},
     {"importance_sampling_ratio": "token"}),
    ("grpo_is_sequence_gspo", dict(loss_type="grpo", importance_sampling_level="sequence", use_vllm=True,
                                   vllm_importance_sampling_correction=True), {},
     {"importance_sampling_ratio": "sequence"}),
    ("on_policy_grpo_kl", dict(loss_type="grpo"), {}, {"old_per_token_logps": None}),
    ("on_policy_sapo_quantile", dict(loss_type="sapo", top_entropy_quantile=0.6), {}, {"old_per_token_logps": None}),
    ("on_policy_dr_grpo_gspo", dict(loss_type="dr_grpo", importance_sampling_level="sequence"), {},
     {"old_per_token_logps": None}),
    ("on_policy_cispo_is", dict(loss_type="cispo", epsilon_high=4.0, use_vllm=True,
                                vllm_importance_sampling_correction=True), {},
     {"old_per_token_logps": None, "importance_sampling_ratio": "token"}),
    ("dapo_tool_mask_compact", dict(loss_type="dapo"), {}, {"tool_mask": True, "compact": True}),
    # use_bias_correction_kl (token level): KL exp(logp - old); on-policy its gradient is k2's, its value k3's
    ("grpo_kl_bias_correction", dict(loss_type="grpo"), dict(use_bias_correction_kl=True), {}),
    ("dapo_kl_bias_correction_is", dict(loss_type="dapo", use_vllm=True, vllm_importance_sampling_correction=True),
     dict(use_bias_correction_kl=True), {"importance_sampling_ratio": "token"}),
    ("on_policy_bnpo_kl_bias_correction", dict(loss_type="bnpo"), dict(use_bias_correction_kl=True),
     {"old_per_token_logps": None}),
    ("on_policy_sapo_kl_bias_correction_quantile", dict(loss_type="sapo", top_entropy_quantile=0.6),
     dict(use_bias_correction_kl=True), {"old_per_token_logps": None}),
    # off_policy_mask_threshold against old_per_token_logps (no vLLM sampling log-probs)
    ("dapo_off_policy_mask", dict(loss_type="dapo", off_policy_mask_threshold=0.0), {}, {}),
    ("grpo_gspo_off_policy_mask", dict(loss_type="grpo", importance_sampling_level="sequence",
                                       off_policy_mask_threshold=0.0), {}, {}),
    ("cispo_off_policy_mask_is", dict(loss_type="cispo", epsilon_high=1.3, off_policy_mask_threshold=0.05,
                                      use_vllm=True, vllm_importance_sampling_correction=True), {},
     {"importance_sampling_ratio": "token"}),
    ("on_policy_grpo_off_policy_mask_negative", dict(loss_type="grpo", off_policy_mask_threshold=-0.1), {},
     {"old_per_token_logps": None}),
    ("on_policy_bnpo_off_policy_mask", dict(loss_type="bnpo", off_policy_mask_threshold=0.1), {},
     {"old_per_token_logps": None}),
    # vespo: its weights, its IS weights inside phi (token modes: 1 at masked positions, as TRL builds them)
    ("vespo_weights", dict(loss_type="vespo"),
     dict(vespo_k_pos=1.5, vespo_lambda_pos=2.5, vespo_k_neg=2.5, vespo_lambda_neg=1.5), {}),
    ("vespo_is_quantile_tool_mask", dict(loss_type="vespo", use_vllm=True, vllm_importance_sampling_correction=True,
                                         vllm_importance_sampling_mode="token_truncate", top_entropy_quantile=0.6),
     {}, {"importance_sampling_ratio": "token", "tool_mask": True}),
    ("vespo_sequence_level_off_policy_mask", dict(loss_type="vespo", importance_sampling_level="sequence",
                                                  off_policy_mask_threshold=0.0), {}, {}),
    ("on_policy_vespo_is", dict(loss_type="vespo", use_vllm=True, vllm_importance_sampling_correction=True,
                                vllm_importance_sampling_mode="token_mask"), {},
     {"old_per_token_logps": None, "importance_sampling_ratio": "token"}),
    # luspo: gspo (or ppo at token level) aggregated seq-mean-token-sum over the B sequences
    ("luspo_sequence", dict(loss_type="luspo", importance_sampling_level="sequence"), {}, {}),
    ("luspo_token_delta_is", dict(loss_type="luspo", use_vllm=True, vllm_importance_sampling_correction=True),
     dict(delta=1.3), {"importance_sampling_ratio": "token"}),
    ("on_policy_luspo_sequence", dict(loss_type="luspo", importance_sampling_level="sequence"), {},
     {"old_per_token_logps": None}),
    ("cispo_delta_unused", dict(loss_type="cispo", epsilon_high=1.3), dict(delta=1.1), {}),
    ("cispo_cap_below_1", dict(loss_type="cispo", epsilon_high=0.8), {}, {}),
    ("on_policy_cispo_cap_below_1_is", dict(loss_type="cispo", epsilon_high=0.5, use_vllm=True,
                                            vllm_importance_sampling_correction=True), {},
     {"old_per_token_logps": None, "importance_sampling_ratio": "token"}),
    # use_bias_correction_kl at sequence level: the KL times the sequence ratio exp(mean log-ratio)
    ("grpo_gspo_kl_bias_correction", dict(loss_type="grpo", importance_sampling_level="sequence"),
     dict(use_bias_correction_kl=True), {}),
    ("dapo_gspo_kl_bias_correction_is_mask", dict(loss_type="dapo", importance_sampling_level="sequence",
                                                  off_policy_mask_threshold=0.0, use_vllm=True,
                                                  vllm_importance_sampling_correction=True),
     dict(use_bias_correction_kl=True), {"importance_sampling_ratio": "sequence"}),
    ("vespo_sequence_kl_bias_correction", dict(loss_type="vespo", importance_sampling_level="sequence"),
     dict(use_bias_correction_kl=True), {}),
    # the off-policy mask against vLLM's sampling log-probs (TRL's rule when the inputs hold them)
    ("dapo_off_policy_mask_sampling_is", dict(loss_type="dapo", off_policy_mask_threshold=0.05, use_vllm=True,
                                              vllm_importance_sampling_correction=True), {},
     {"sampling_per_token_logps": 0.3, "importance_sampling_ratio": "token"}),
    ("grpo_gspo_off_policy_mask_sampling", dict(loss_type="grpo", importance_sampling_level="sequence",
                                                off_policy_mask_threshold=0.0), {}, {"sampling_per_token_logps": -0.5}),
    ("vespo_off_policy_mask_sampling", dict(loss_type="vespo", off_policy_mask_threshold=0.1), {},
     {"sampling_per_token_logps": -0.5}),
    ("on_policy_bnpo_off_policy_mask_sampling", dict(loss_type="bnpo", off_policy_mask_threshold=0.1), {},
     {"old_per_token_logps": None, "sampling_per_token_logps": 0.3}),
    ("on_policy_sapo_off_policy_mask_sampling_bonus", dict(loss_type="sapo", off_policy_mask_threshold=0.0,
                                                           _entropy_bonus_enabled=True, entropy_coef=0.1), {},
     {"old_per_token_logps": None, "sampling_per_token_logps": 0.2}),
    # the entropy bonus: a token mean over mask * entropy_mask / GA whatever the loss type's normaliser
    ("grpo_entropy_bonus", dict(loss_type="grpo", _entropy_bonus_enabled=True, entropy_coef=0.05), {}, {}),
    ("dapo_entropy_bonus_quantile_accumulation", dict(loss_type="dapo", _entropy_bonus_enabled=True, entropy_coef=0.1,
                                                      top_entropy_quantile=0.5, current_gradient_accumulation_steps=2),
     {}, {}),
    ("bnpo_entropy_bonus_tool_mask", dict(loss_type="bnpo", _entropy_bonus_enabled=True, entropy_coef=-0.3), {},
     {"tool_mask": True}),
    ("vespo_entropy_bonus_is", dict(loss_type="vespo", _entropy_bonus_enabled=True, entropy_coef=0.2, use_vllm=True,
                                    vllm_importance_sampling_correction=True), {},
     {"importance_sampling_ratio": "token"}),
    ("luspo_gspo_entropy_bonus", dict(loss_type="luspo", importance_sampling_level="sequence",
                                      _entropy_bonus_enabled=True, entropy_coef=0.1), {}, {}),
    ("on_policy_dr_grpo_entropy_bonus", dict(loss_type="dr_grpo", _entropy_bonus_enabled=True, entropy_coef=0.1), {},
     {"old_per_token_logps": None}),
    # adaptive entropy: the coefficient applies while the last window's entropy is <= entropy_target; TRL's
    # controller then updates it (from fastppo's entropies)
    ("sapo_adaptive_entropy_on", dict(loss_type="sapo", _entropy_bonus_enabled=True, use_adaptive_entropy=True,
                                      entropy_coef=0.2, _last_world_entropy=0.1), dict(entropy_target=1.0), {}),
    ("cispo_adaptive_entropy_gated", dict(loss_type="cispo", epsilon_high=1.3, _entropy_bonus_enabled=True,
                                          use_adaptive_entropy=True, entropy_coef=0.2, _last_world_entropy=5.0),
     dict(entropy_target=1.0), {}),
]


@contextlib.contextmanager
def _configured(tr, attrs, args):
    saved = [(o, k, getattr(o, k)) for o, kv in ((tr, attrs), (tr.args, args)) for k in kv]
    for o, kv in ((tr, attrs), (tr.args, args)):
        for k, v in kv.items():
            setattr(o, k, v)
    try:
        yield
    finally:
        for o, k, v in saved:
            setattr(o, k, v)


def _inputs(base, changes):
    x = dict(base)
    g = torch.Generator().manual_seed(2)
    B, T = base["completion_mask"].shape
    for k, v in changes.items():
        if k == "importance_sampling_ratio":
            x[k] = 0.5 + torch.rand((B, T) if v == "token" else (B, 1), generator=g)
        elif k == "tool_mask":
            x[k] = (torch.rand(B, T, generator=g) > 0.3).long()
        elif k == "sampling_per_token_logps":   # vLLM's log-probs: off the old ones (the policy's, on-policy),
            # noisy, with an unscorable token (NaN: TRL's get_off_policy_mask takes it as no KL evidence)
            base_lp = base["old_per_token_logps"] if changes.get("old_per_token_logps", 0) is not None \
                else base["ref_per_token_logps"]
            x[k] = base_lp + v + 0.3 * torch.randn(B, T, generator=g)
            x[k][0, 1] = float("nan")
        elif k != "compact":
            x[k] = v
    if changes.get("importance_sampling_ratio") == "token":   # 1 at masked positions, as TRL builds it
        m = x["completion_mask"] * x.get("tool_mask", 1)
        x["importance_sampling_ratio"] = torch.where(m != 0, x["importance_sampling_ratio"], 1.0)
    return {k: v for k, v in x.items() if v is not None}


_CONTROLLER = ("entropy_coef", "_last_world_entropy", "_entropy_window_stats")   # adaptive entropy's state


def _step(tr, inputs, patched, monkeypatch=None, compact=False, ops=None):
    """TRL's _compute_loss + backward: (loss, gradients by parameter, last logged metrics, stats). The adaptive
    entropy controller's state is put back after the step (its update runs in TRL's code, patched or not)."""
    tr.model.zero_grad(set_to_none=True)
    tr._metrics["train"].clear()
    controller = {k: getattr(tr, k) for k in _CONTROLLER}
    handle = (fi.patch("trl") if ops is None else fi.patch("trl", ops=ops)) if patched else None
    try:
        with contextlib.ExitStack() as stack:
            if compact:   # the layout TRL uses on Triton devices: only the completion rows reach the head
                import trl.trainer.utils as u

                mp = stack.enter_context(pytest.MonkeyPatch.context())
                mp.setattr(u, "_use_triton", lambda device: True)
                # TRL's own head would then launch its Triton kernels: keep it on its PyTorch tiles
                mp.setattr("trl.kernels.chunked_logprob._use_triton", lambda device: False)
            loss = tr._compute_loss(tr.model, inputs)
            loss.backward()
        stats = None if handle is None else (dict(handle.stats.served), dict(handle.stats.delegated))
    finally:
        if handle is not None:
            handle.undo()
        for k, v in controller.items():
            setattr(tr, k, v)
    grads = {n: p.grad.clone() for n, p in tr.model.named_parameters() if p.grad is not None}
    metrics = {k: v[-1] for k, v in tr._metrics["train"].items()}
    return loss.detach(), grads, metrics, stats


@pytest.mark.parametrize("name,attrs,args,changes", CASES, ids=[c[0] for c in CASES])
def test_served_step_matches_trl(step_rig, name, attrs, args, changes):
    tr, base = step_rig
    inputs = _inputs(base, changes)
    with _configured(tr, attrs, args):
        assert trl_grpo.unsupported_reason(tr, inputs) is None
        loss_a, grads_a, met_a, _ = _step(tr, inputs, False)
        loss_b, grads_b, met_b, stats = _step(tr, inputs, True, compact=changes.get("compact", False))
    assert stats == ({NAME: 1}, {})
    assert loss_a.abs() > 0 and loss_a.requires_grad is False
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-7)
    assert sorted(grads_a) == sorted(grads_b) and len(grads_a) > 0
    for k in grads_a:
        assert grads_b[k].dtype == grads_a[k].dtype
        torch.testing.assert_close(grads_b[k], grads_a[k], rtol=1e-4, atol=1e-6, msg=k)
    assert sorted(met_a) == sorted(met_b)
    for k in met_a:   # TRL's metrics, computed by TRL from fastppo's log-probs and entropies
        torch.testing.assert_close(torch.tensor(met_b[k]), torch.tensor(met_a[k]), rtol=1e-5, atol=1e-6, msg=k)


DELEGATED = [   # (name, trainer attributes, args attributes, input changes, reason)
    ("on_policy_gspo_off_policy_mask_sampling", dict(importance_sampling_level="sequence",
                                                     off_policy_mask_threshold=0.0),
     {}, {"old_per_token_logps": None, "sampling_per_token_logps": 0.3}, "the off-policy mask"),
    ("bias_correction_kl_sequence", dict(importance_sampling_level="sequence"), dict(use_bias_correction_kl=True),
     {"old_per_token_logps": None}, "on-policy use_bias_correction_kl at importance_sampling_level='sequence'"),
    ("vespo_is_clip_excludes_1", dict(loss_type="vespo", use_vllm=True, vllm_importance_sampling_correction=True,
                                      vllm_importance_sampling_mode="token_mask",
                                      vllm_importance_sampling_clip_min=1.2), {},
     {"importance_sampling_ratio": "token"}, "an IS clip range that excludes 1"),
    ("vespo_is_sequence", dict(loss_type="vespo", use_vllm=True, vllm_importance_sampling_correction=True), {},
     {"importance_sampling_ratio": "sequence"}, "vespo with sequence-level IS weights"),
    ("sapo_sequence", dict(loss_type="sapo", importance_sampling_level="sequence"), {}, {}, "at importance_sampling"),
    ("delta_sequence", dict(loss_type="grpo", importance_sampling_level="sequence"), dict(delta=2.0), {},
     "delta=2.0"),
    ("luspo_delta_sequence", dict(loss_type="luspo", importance_sampling_level="sequence"), dict(delta=2.0), {},
     "delta=2.0"),
    ("epsilon_above_1", dict(loss_type="grpo", epsilon_low=1.5), {}, {}, "epsilon=1.5"),
]


@pytest.mark.parametrize("name,attrs,args,changes,reason", DELEGATED, ids=[c[0] for c in DELEGATED])
def test_unsupported_configurations_are_delegated(step_rig, name, attrs, args, changes, reason):
    tr, base = step_rig
    inputs = _inputs(base, changes)
    with _configured(tr, attrs, args):
        assert reason in trl_grpo.unsupported_reason(tr, inputs)
        if name in ("on_policy_gspo_off_policy_mask_sampling", "bias_correction_kl_sequence"):
            # TRL's own loss runs (its head served by linear_logprobs)
            loss_a, grads_a, _, _ = _step(tr, inputs, False)
            loss_b, grads_b, _, stats = _step(tr, inputs, True)
            assert stats == ({"ChunkedLogProbFunction": 1}, {NAME: 1})
            torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("loss_type", ["luspo", "dapo"])
def test_gspo_over_the_cap_runs_trl_on_cpu(step_rig, loss_type):
    """fastppo's gspo caps a sequence's mean log-ratio at 10 (verl's clamp), TRL does not: on CPU (a free host
    read) a step where a valid sequence exceeds it computes TRL's own loss from TRL's head, counted delegated
    (here only _compute_loss is patched, so TRL's own head runs: its exact numbers); just under the cap it is
    served with TRL's numbers."""
    tr, base = step_rig
    m = base["completion_mask"].bool()
    for shift, served in ((10.5, False), (9.5, True)):
        inputs = dict(base)
        old = base["old_per_token_logps"].clone()
        logp = tr._get_per_token_logps_and_entropies(   # the policy's log-probs: old = logp - shift on row 1
            tr.model, torch.cat([base["prompt_ids"], base["completion_ids"]], 1),
            torch.cat([base["prompt_mask"], base["completion_mask"]], 1), m.shape[1])[0].detach()
        old[1] = logp[1] - shift
        inputs["old_per_token_logps"] = old
        with _configured(tr, dict(loss_type=loss_type, importance_sampling_level="sequence"), {}):
            loss_a, grads_a, _, _ = _step(tr, inputs, False)
            loss_b, grads_b, _, stats = _step(tr, inputs, True, ops=[NAME])
        assert stats == (({NAME: 1}, {}) if served else ({}, {NAME: 1})), shift
        torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-7)
        for k in grads_a:   # the ratio e^9.5 scales row 1's gradient: absolute tolerance by the gradient's scale
            scale = grads_a[k].abs().max().item()
            torch.testing.assert_close(grads_b[k], grads_a[k], rtol=1e-4, atol=1e-6 * max(scale, 1.0), msg=k)


def test_undo_restores_trl():
    import trl.trainer.utils as u
    from trl.trainer.grpo_trainer import GRPOTrainer

    original, head = GRPOTrainer._compute_loss, u._ChunkedLogProbFunction
    with fi.patch("trl") as h:
        assert GRPOTrainer._compute_loss is not original and h.replaced[NAME] == ["GRPOTrainer._compute_loss"]
        assert GRPOTrainer._compute_loss.__fastppo_original__ is original
    assert GRPOTrainer._compute_loss is original and u._ChunkedLogProbFunction is head


def _same_training(a, b):
    assert len(a["loss"]) == len(b["loss"]) >= 2
    torch.testing.assert_close(torch.tensor(a["loss"]), torch.tensor(b["loss"]), rtol=1e-5, atol=1e-6)
    for k in a["params"]:
        torch.testing.assert_close(a["params"][k], b["params"][k], rtol=1e-4, atol=1e-4, msg=k)
    torch.testing.assert_close(torch.tensor(a["grad_norm"]), torch.tensor(b["grad_norm"]), rtol=1e-4, atol=1e-6)
    assert max(b["grad_norm"]) > 0   # the steps trained (an on-policy GRPO loss is 0 in value: mean advantage 0)


@pytest.mark.parametrize("config", [
    dict(loss_type="dapo", beta=0.04, use_bias_correction_kl=False, model_path=True, gradient_accumulation_steps=2,
         steps_per_generation=2, epsilon_high=0.28, max_steps=2),
    dict(loss_type="grpo", importance_sampling_level="sequence", steps_per_generation=1, max_steps=2),
    dict(loss_type="bnpo", top_entropy_quantile=0.5, max_steps=2, delta=1.5, temperature=0.7),
    # TRL's defaults with a KL term (use_bias_correction_kl=True, loss_type dapo) and the off-policy mask
    dict(beta=0.04, model_path=True, off_policy_mask_threshold=0.0, max_steps=2),
    dict(loss_type="vespo", beta=0.04, model_path=True, steps_per_generation=1, max_steps=2),
    dict(loss_type="luspo", importance_sampling_level="sequence", max_steps=2),
    # the entropy bonus, adaptive: the first window applies 0 (no entropy measured yet), the controller then raises
    # the coefficient from fastppo's entropies and the second step applies it
    dict(loss_type="dr_grpo", use_adaptive_entropy=True, entropy_coef=0.05, entropy_target=100.0,
         entropy_coef_delta=0.05, top_entropy_quantile=0.6, max_steps=2),
    # (a smaller step: the two runs' gradients agree to ~2e-7, but Adam at lr 5e-2 moves a near-zero-gradient
    # element by the full step, which turned a ~1e-7 difference into 1.3e-4 on one of 2048 weights)
    dict(loss_type="grpo", importance_sampling_level="sequence", beta=0.04, use_bias_correction_kl=True,
         model_path=True, steps_per_generation=2, max_steps=2, learning_rate=1e-2),
    dict(loss_type="cispo", epsilon_high=0.8, entropy_coef=0.02, max_steps=2),
], ids=["dapo_kl_accumulation", "on_policy_gspo", "bnpo_entropy_quantile_delta_temperature",
        "default_bias_corrected_kl_off_policy_mask", "on_policy_vespo_bias_corrected_kl", "luspo_sequence",
        "adaptive_entropy_bonus_quantile", "gspo_bias_corrected_kl_sequence", "cispo_cap_below_1_entropy_bonus"])
@pytest.mark.slow
def test_training_runs_match_trl(tmp_path, config):
    """Whole GRPOTrainer.train() runs (generation, scoring, optimizer steps): per-step losses and final
    parameters patched vs unpatched."""
    base = grpo_run(False, tmp_path / "a", **config)
    ours = grpo_run(True, tmp_path / "b", **config)
    _same_training(ours, base)
    assert ours["served"][NAME] == config.get("gradient_accumulation_steps", 1) * config["max_steps"]
    assert ours["delegated"] == {}


def test_step_flops_below_trl(tmp_path):
    """One GRPOTrainer step (_compute_loss + backward) on a head-dominated tiny Llama (H=128, V=4096, one
    layer; 8 completions of 8 tokens after 3-token prompts), counted: tl.dot FLOPs of fastppo's kernels in the
    interpreter (whole tiles) plus the eager matmul FLOPs (backbone; TRL's head on CPU). The backbone costs the
    same on both sides, so the difference is TRL's head: 8 N H V over every position on CPU (it projects all
    B (L - 1) rows there; compact rows on Triton devices), against fastppo's 6 N_valid H V."""
    import math

    from fastppo.bench.counters import DotFlops, EagerTraffic, hide_interpreter_copies

    H, V = 128, 4096
    tr = grpo_trainer(tmp_path, hidden=H, words=[f"w{i}" for i in range(V - 4)], per_device_train_batch_size=8,
                      num_generations=4, steps_per_generation=2, max_completion_length=8)
    tr.model.train()
    tr.current_gradient_accumulation_steps = 1
    inputs = tr._prepare_inputs(next(iter(tr.get_train_dataloader())))

    def count(patched):
        tr.model.zero_grad(set_to_none=True)
        handle = fi.patch("trl") if patched else None
        dots, eager = DotFlops(), EagerTraffic()
        try:
            with dots.count(), hide_interpreter_copies(), eager:
                loss = tr._compute_loss(tr.model, inputs)
                loss.backward()
        finally:
            if handle is not None:
                assert handle.stats.served == {NAME: 1}
                handle.undo()
        return dots.flops, eager.flops, loss.detach()

    trl_dots, trl_eager, trl_loss = count(False)
    dots, eager, loss = count(True)
    torch.testing.assert_close(loss, trl_loss, rtol=1e-5, atol=1e-7)
    B, P = inputs["prompt_ids"].shape
    T = inputs["completion_ids"].shape[1]
    n_all, n_valid = B * (P + T - 1), int(inputs["completion_mask"].sum())
    backbone = eager   # patched: every head FLOP is a tl.dot
    assert trl_dots == 0 and trl_eager - backbone == 8 * n_all * H * V   # the counters see TRL's whole head
    assert 6 * n_valid * H * V <= dots <= 6 * math.ceil(n_valid / 64) * 64 * H * V
    ratio = (dots + eager) / trl_eager
    ratio_compact = (dots + eager) / (backbone + 8 * n_valid * H * V)   # against TRL's compact (GPU) head
    assert ratio <= 0.85 and ratio_compact <= 0.85, (ratio, ratio_compact)


def _rel_err(x, ref):
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.mark.parametrize("hidden_dtype", [torch.float32, torch.bfloat16])
def test_fused_head_bf16_autocast_gradients_as_trl(hidden_dtype):
    """#25 bf16: under bf16 autocast with an fp32 head (mixed precision), TRL's head returns each gradient in
    its input's dtype from fp32 accumulators; so does the patched head (no bf16 rounding of an fp32 weight's
    gradient), and its error against the float64 gradient is no worse than TRL's."""
    import trl.trainer.utils as u

    N, H, V = 37, 24, 211
    g = torch.Generator().manual_seed(5)
    h0, w0, b0 = torch.randn(N, H, generator=g), torch.randn(V, H, generator=g) * 0.5, torch.randn(V, generator=g)
    t = torch.randint(0, V, (N,), generator=g)
    gl, ge = torch.randn(N, generator=g), torch.randn(N, generator=g)

    def run(patched, dtype=None, autocast=True):
        ins = [h0.to(hidden_dtype if dtype is None else dtype), w0.to(dtype or torch.float32),
               b0.to(dtype or torch.float32)]
        ins = [x.clone().requires_grad_() for x in ins]
        with contextlib.ExitStack() as stack:
            handle = stack.enter_context(fi.patch("trl", ops=["ChunkedLogProbFunction"])) if patched else None
            stack.enter_context(torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast))
            lp, ent, *_ = u._ChunkedLogProbFunction.apply(*ins, t, 0.9, 64, None, 1.0, ("log_probs", "entropy"))
            if handle is not None:
                assert handle.stats.served["ChunkedLogProbFunction"] == 1
        ((lp * gl).sum() + (ent * ge).sum()).backward()
        return [x.grad for x in ins]

    ref = run(False, torch.float64, autocast=False)
    theirs, ours = run(False), run(True)
    for name, a, b, r in zip(("hidden", "weight", "bias"), theirs, ours, ref):
        assert b.dtype == a.dtype, name
        if b.dtype == torch.float32:   # fp32 accumulators, not rounded to bf16 on the way back
            assert not torch.equal(b, b.to(torch.bfloat16).float()), name
        assert _rel_err(b, r) <= _rel_err(a, r), (name, _rel_err(b, r), _rel_err(a, r))


def test_served_step_under_bf16_autocast(step_rig):
    """The whole loss under bf16 autocast (TRL's mixed precision: fp32 parameters): every gradient in its
    parameter's dtype, its error against the fp32 step no worse than TRL's own bf16 step's."""
    tr, inputs = step_rig
    with _configured(tr, dict(loss_type="dapo"), {}):
        ref = _step(tr, inputs, False)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            theirs = _step(tr, inputs, False)
            ours = _step(tr, inputs, True)
    assert ours[3] == ({NAME: 1}, {})
    assert _rel_err(theirs[1]["lm_head.weight"], ref[1]["lm_head.weight"]) > 1e-4   # autocast did act
    assert abs(ours[0] - ref[0]) <= 1.05 * abs(theirs[0] - ref[0]) + 1e-6
    for k, r in ref[1].items():
        assert ours[1][k].dtype == theirs[1][k].dtype == r.dtype, k
        err, trl_err = _rel_err(ours[1][k], r), _rel_err(theirs[1][k], r)
        assert err <= trl_err + 1e-6, (k, err, trl_err)


def test_eval_step_matches_trl(step_rig):
    """The loss prediction_step takes (eval mode, no_grad, on prepared inputs): TRL's normalisers without
    gradient accumulation."""
    tr, inputs = step_rig
    losses = []
    for patched in (False, True):
        with _configured(tr, dict(loss_type="bnpo", current_gradient_accumulation_steps=3), {}):
            tr.model.eval()
            try:
                with fi.patch("trl") if patched else contextlib.nullcontext() as handle:
                    with torch.no_grad():
                        losses.append(tr.compute_loss(tr.model, inputs))
                    if handle is not None:
                        assert handle.stats.served[NAME] == 1
            finally:
                tr.model.train()
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-7)
