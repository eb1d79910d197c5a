"""The `vocab_parallel=` keyword of the four logits / linear ops: on 2 gloo processes, the public op with
vocab_parallel=VocabParallel(group) gives what fastppo.distributed.<op>(..., group=) gives (values and every
gradient, bit for bit: one implementation), and a bad value is refused with a TypeError before any collective."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import fastppo
import fastppo.distributed
from tests.ops.test_distributed import run_ranks


def _run_both(op, wrapper, make, group):
    """(outputs, grads) of op(..., vocab_parallel=VocabParallel(group)) and wrapper(..., group=group)."""
    results = []
    for call in (lambda a, kw: op(*a, vocab_parallel=fastppo.VocabParallel(group), **kw),
                 lambda a, kw: wrapper(*a, group=group, **kw)):
        args, kwargs, leaves = make()
        out = call(args, kwargs)
        if isinstance(out, fastppo.PPOLossOutput):
            loss, vals = out.loss, [out.loss, out.logprobs, out.entropy, *out.stats.values()]
        else:
            vals = list(out) if isinstance(out, tuple) else [out]
            loss = sum((v * (i + 2)).sum() for i, v in enumerate(vals))
        loss.backward()
        results.append(([v.detach() for v in vals], [t.grad for t in leaves]))
    return results


def _worker(rank, world):
    from fastppo import distributed as D

    group = dist.new_group([0, 1])
    B, T, V, H = 2, 5, 13, 4
    lo, hi = (0, 6) if rank == 0 else (6, V)
    gen = torch.Generator().manual_seed(0)
    logits, hidden, weight = torch.randn(B, T, V, generator=gen), torch.randn(B, T, H, generator=gen), \
        torch.randn(V, H, generator=gen)
    labels = torch.randint(0, V, (B, T), generator=gen)
    labels[0, 1] = -100
    old, adv = torch.randn(B, T, generator=gen), torch.randn(B, T, generator=gen)
    mask = torch.rand(B, T, generator=gen) > 0.3
    loss_kw = dict(entropy_coef=0.01, return_entropy=True, temperature=0.7)

    def logits_args(*rest, **kw):
        def make():
            z = logits[..., lo:hi].clone().requires_grad_()
            return (z, labels, *rest), kw, [z]
        return make

    def linear_args(*rest, **kw):
        def make():
            h, w = hidden.clone().requires_grad_(), weight[lo:hi].clone().requires_grad_()
            return (h, w, labels, *rest), kw, [h, w]
        return make

    cases = [
        (fastppo.token_logprobs, D.token_logprobs, logits_args(return_entropy=True, logit_scale=0.9)),
        (fastppo.fused_ppo_loss, D.fused_ppo_loss, logits_args(old, adv, mask, **loss_kw)),
        (fastppo.linear_logprobs, D.linear_logprobs, linear_args(return_entropy=True)),
        (fastppo.fused_linear_ppo_loss, D.fused_linear_ppo_loss, linear_args(old, adv, mask, **loss_kw)),
    ]
    for op, wrapper, make in cases:
        (vals_a, grads_a), (vals_b, grads_b) = _run_both(op, wrapper, make, group)
        assert len(vals_a) == len(vals_b) and len(grads_a) == len(grads_b)
        for a, b in zip(vals_a + grads_a, vals_b + grads_b):
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    # the sharded result is the full-vocabulary one, not the shard's own softmax
    full = fastppo.token_logprobs(logits, labels)
    torch.testing.assert_close(fastppo.token_logprobs(logits[..., lo:hi], labels,
                                                      vocab_parallel=fastppo.VocabParallel(group)), full)


def test_vocab_parallel_keyword_equals_the_distributed_ops():
    run_ranks(_worker)


@pytest.mark.parametrize("bad", [True, "group", 0])
def test_a_bad_vocab_parallel_value_is_a_type_error(bad):
    logits, labels = torch.randn(2, 3, 7), torch.randint(0, 7, (2, 3))
    hidden, weight = torch.randn(2, 3, 4), torch.randn(7, 4)
    old, adv, mask = torch.randn(2, 3), torch.randn(2, 3), torch.ones(2, 3, dtype=torch.bool)
    calls = [lambda **kw: fastppo.token_logprobs(logits, labels, **kw),
             lambda **kw: fastppo.fused_ppo_loss(logits, labels, old, adv, mask, **kw),
             lambda **kw: fastppo.linear_logprobs(hidden, weight, labels, **kw),
             lambda **kw: fastppo.fused_linear_ppo_loss(hidden, weight, labels, old, adv, mask, **kw)]
    want = f"vocab_parallel must be a fastppo.VocabParallel or None, got {type(bad).__name__} {bad!r}"
    for call in calls:
        with pytest.raises(TypeError) as info:
            call(vocab_parallel=bad)
        assert str(info.value) == want


@pytest.mark.parametrize("group", ["world", 3])
def test_a_bad_group_is_a_type_error(group):
    with pytest.raises(TypeError, match=r"VocabParallel.group must be a torch.distributed.ProcessGroup or None, "
                                        rf"got \w+ {group!r}"):
        fastppo.VocabParallel(group)
    with pytest.raises(TypeError, match="VocabParallel.group must be"):
        fastppo.distributed.token_logprobs(torch.randn(2, 5), torch.tensor([0, 1]), group=group)


def test_the_packed_and_extra_outputs_forms_are_refused_with_vocab_parallel():
    hidden, weight, labels = torch.randn(3, 4), torch.randn(7, 4), torch.tensor([0, 1, 2])
    vp = fastppo.VocabParallel()
    with pytest.raises(ValueError, match="extra_outputs is not offered with vocab_parallel"):
        fastppo.linear_logprobs(hidden, weight, labels, extra_outputs=("is_top1",), vocab_parallel=vp)
    old, adv, mask = torch.randn(3), torch.randn(3), torch.ones(3, dtype=torch.bool)
    cu = torch.tensor([0, 1, 3])
    with pytest.raises(ValueError, match="cu_seqlens .* is not offered with vocab_parallel"):
        fastppo.fused_ppo_loss(torch.randn(3, 7), labels, old, adv, mask, cu_seqlens=cu, vocab_parallel=vp)
    with pytest.raises(ValueError, match="cu_seqlens .* is not offered with vocab_parallel"):
        fastppo.fused_linear_ppo_loss(hidden, weight, labels, old, adv, mask, cu_seqlens=cu, vocab_parallel=vp)
