"""`fastppo check` compares every op with an independent float64 computation: a broken op makes its
line (and only its line) fail, on whichever backend runs the ops."""

import pytest
import torch

import fastppo.advantages_torch as torch_advantages
import fastppo.kernels.gae as triton_gae
import fastppo.kernels.kl as triton_kl
import fastppo.kernels.loss_agg as triton_agg
import fastppo.kl_torch as torch_kl
import fastppo.losses_torch as torch_losses
from fastppo.check import run_check


def _run(select, dtypes=(torch.float32,)):
    lines = []
    ok = run_check(print_fn=lines.append, dtypes=dtypes, select=select)
    return ok, [line for line in lines if line.startswith("  ")]


def _scaled_policy(fn):
    def broken(*args, **kw):
        res = fn(*args, **kw)
        return res._replace(loss=res.loss * 1.001)
    return broken


def _shifted_kl(fn):
    def broken(logp, ref, kind):
        kl, dkl = fn(logp, ref, kind)
        return kl, dkl * 1.01
    return broken


def _biased_gae(fn):
    def broken(*args):
        adv, ret = fn(*args)
        return adv + 1e-2, ret
    return broken


@pytest.mark.parametrize("select,patches", [
    ("ppo_policy_loss[sapo]", [(triton_agg, "policy_loss_agg", _scaled_policy),
                               (torch_losses, "policy_loss_agg", _scaled_policy)]),
    ("kl_penalty", [(triton_kl, "kl_fwd", _shifted_kl), (torch_kl, "kl_fwd", _shifted_kl)]),
    ("gae", [(triton_gae, "gae_fwd", _biased_gae), (torch_advantages, "gae_fwd", _biased_gae)]),
])
def test_a_broken_op_fails_its_line(monkeypatch, select, patches):
    ok, lines = _run(select)
    assert ok and lines and all(line.startswith("  ok") for line in lines)
    for module, name, wrap in patches:
        monkeypatch.setattr(module, name, wrap(getattr(module, name)))
    ok, lines = _run(select)
    assert not ok and all(line.startswith("  BAD") for line in lines), lines


def test_check_covers_fp32_and_bf16():
    ok, lines = _run("value_loss", dtypes=(torch.float32, torch.bfloat16))
    assert ok and len(lines) == 2 and "float32" in lines[0] and "bfloat16" in lines[1]


def _biased(fn):
    def broken(*args, **kw):
        out = fn(*args, **kw)
        if hasattr(out, "loss"):
            out.loss = out.loss * 1.001
            return out
        return out + 1e-3
    return broken


@pytest.mark.parametrize("name", ["fused_linear_ppo_loss", "group_advantages", "masked_whiten", "kl_shaped_rewards"])
def test_the_trainer_ops_have_a_line_that_fails_when_the_op_is_wrong(monkeypatch, name):
    import fastppo

    ok, lines = _run(name)
    assert ok and len(lines) == 1 and name in lines[0] and lines[0].startswith("  ok")
    monkeypatch.setattr(fastppo, name, _biased(getattr(fastppo, name)))
    ok, lines = _run(name)
    assert not ok and len(lines) == 1 and lines[0].startswith("  BAD"), lines
