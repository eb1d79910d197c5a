"""One logit transform z' = softcap(logit_scale * z) / temperature (fastppo.options.LogitTransform) for every
logits and linear op and their vocabulary-parallel versions: the same bad value is refused by all eight with
the same error, before any collective (the sharded ops need no process group to refuse it)."""

import math

import pytest
import torch

import fastppo
import fastppo.distributed as dist_ops

BAD = [
    (dict(temperature=0.0), ValueError, "temperature must be a positive number, got 0.0"),
    (dict(temperature=-1.0), ValueError, "temperature must be a positive number, got -1.0"),
    (dict(temperature=math.inf), ValueError, "temperature must be a finite number, got inf"),
    (dict(temperature=math.nan), ValueError, "temperature must be a finite number, got nan"),
    (dict(logit_scale=0.0), ValueError, "logit_scale must be a finite non-zero number, got 0.0"),
    (dict(logit_scale=math.inf), ValueError, "logit_scale must be a finite number, got inf"),
    (dict(logit_scale=math.nan), ValueError, "logit_scale must be a finite number, got nan"),
    (dict(logit_scale=None), TypeError, "logit_scale must be a number, got NoneType None"),
    (dict(logit_scale=True), TypeError, "logit_scale must be a number, got bool True"),
    (dict(final_logit_softcapping=0.0), ValueError, "final_logit_softcapping must be a positive number, got 0.0"),
    (dict(final_logit_softcapping=-30.0), ValueError,
     "final_logit_softcapping must be a positive number, got -30.0"),
    (dict(final_logit_softcapping=math.inf), ValueError, "final_logit_softcapping must be a finite number, got inf"),
    (dict(final_logit_softcapping="30"), TypeError, "final_logit_softcapping must be a number, got str '30'"),
]


def _ops():
    B, T, V, H = 2, 3, 11, 4
    logits = torch.randn(B, T, V)
    hidden, weight = torch.randn(B, T, H), torch.randn(V, H)
    labels = torch.randint(0, V, (B, T))
    old, adv, mask = torch.randn(B, T), torch.randn(B, T), torch.ones(B, T, dtype=torch.bool)
    return {
        "token_logprobs": lambda **kw: fastppo.token_logprobs(logits, labels, **kw),
        "fused_ppo_loss": lambda **kw: fastppo.fused_ppo_loss(logits, labels, old, adv, mask, **kw),
        "linear_logprobs": lambda **kw: fastppo.linear_logprobs(hidden, weight, labels, **kw),
        "fused_linear_ppo_loss": lambda **kw: fastppo.fused_linear_ppo_loss(hidden, weight, labels, old, adv, mask,
                                                                            **kw),
        "distributed.token_logprobs": lambda **kw: dist_ops.token_logprobs(logits, labels, **kw),
        "distributed.fused_ppo_loss": lambda **kw: dist_ops.fused_ppo_loss(logits, labels, old, adv, mask, **kw),
        "distributed.linear_logprobs": lambda **kw: dist_ops.linear_logprobs(hidden, weight, labels, **kw),
        "distributed.fused_linear_ppo_loss": lambda **kw: dist_ops.fused_linear_ppo_loss(hidden, weight, labels, old,
                                                                                         adv, mask, **kw),
    }


@pytest.mark.parametrize("bad, exc, message", BAD, ids=[f"{k}={v!r}" for (b, _, _) in BAD for k, v in b.items()])
def test_every_logits_op_refuses_a_bad_transform_with_the_same_error(bad, exc, message):
    for name, op in _ops().items():
        with pytest.raises(exc) as info:
            op(**bad)
        assert str(info.value) == message, f"{name}: {info.value}"


def test_the_good_edge_values_run_everywhere_unsharded():
    """A negative scale and a tiny temperature are valid transforms (not refused by any op)."""
    for name, op in _ops().items():
        if not name.startswith("distributed."):
            op(logit_scale=-0.5, temperature=1e-3, final_logit_softcapping=5.0)
