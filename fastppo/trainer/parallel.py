"""Data-parallel training under torchrun: `--parallel ddp` (DistributedDataParallel) or `--parallel fsdp2`
(torch.distributed.fsdp.fully_shard on every decoder layer, then the root), gloo on CPU, nccl on GPU.

    torchrun --nproc_per_node 4 -m fastppo.cli train --parallel fsdp2 ...
    torchrun --nnodes 2 --node_rank R --nproc_per_node 8 --rdzv_endpoint HOST:PORT -m fastppo.cli train ...

What each rank does in one iteration (B = batch_size, W = world size):
  rollout    the B prompts are drawn on every rank from the same generator; rank r generates, scores and
             computes old / ref log-probs (and values) for rows [r B / W, (r + 1) B / W). Sampling is keyed by
             the GLOBAL row index (CounterSampler), so the responses do not depend on W.
  gather     the rollouts (token ids, masks, log-probs, scores: O(B T) numbers) are all-gathered, so every
             rank holds the whole batch: group advantages see whole groups, GAE and whitening the whole batch,
             and every count a loss needs is global without a further collective.
  update     each global minibatch (B / minibatches rows, one random order shared by all ranks) is split
             into W contiguous parts and each part into grad_accum micro-batches. A micro-batch's loss is
             normalised by the GLOBAL minibatch counts (num_tokens, num_seqs, horizon), so the micro-batch
             losses of all ranks add up to the minibatch loss; it is multiplied by W before backward because
             DDP and FSDP2 average gradients over ranks. Gradients are synchronised on the last micro-batch.
  metrics    losses summed and token-weighted statistics combined over ranks (one all-reduce per step);
             rank 0 writes metrics, reports and checkpoints.
  checkpoint full (unsharded) weights and optimiser state gathered to rank 0 and written atomically, so a run
             resumes with any world size (FSDP2 checkpoints store the optimiser by parameter name, DDP / single
             process ones by index: the two kinds do not mix).

Communication per optimiser step: one gradient all-reduce (DDP: 2 x params bytes on the wire per rank with a
ring) or FSDP2's all-gather of each layer's parameters in forward and backward plus a reduce-scatter of its
gradients (3 x params bytes per rank), plus two all-reduces of a few floats. Per iteration: the rollout
all-gather (about 30 bytes per token).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from transformers import LogitsProcessor

from .kept_rows import KeptRows

KINDS = ("none", "ddp", "fsdp2")


@dataclass
class Parallel:
    kind: str = "none"
    rank: int = 0
    world: int = 1

    # ------------------------------------------------------------------ setup
    @classmethod
    def setup(cls, kind: str, device: torch.device) -> Parallel:
        """Join the torchrun process group (env:// rendezvous; nccl for CUDA, gloo for CPU). A process started
        without torchrun and a non-"none" kind forms a group of one."""
        if kind not in KINDS:
            raise ValueError(f"--parallel={kind!r}: must be one of {KINDS}")
        env_world = int(os.environ.get("WORLD_SIZE", "1"))
        if kind == "none":
            if env_world > 1:
                raise ValueError(f"launched with WORLD_SIZE={env_world} (torchrun): pass --parallel ddp or fsdp2")
            return cls()
        if not dist.is_initialized():
            if "RANK" not in os.environ:
                os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                                  MASTER_PORT=os.environ.get("MASTER_PORT", str(_free_port())))
            if device.type == "cuda":
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return cls(kind, dist.get_rank(), dist.get_world_size())

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def close(self):
        if self.kind != "none" and dist.is_initialized():
            dist.destroy_process_group()

    # ------------------------------------------------------------------ models
    def wrap(self, model, *, device: torch.device):
        """The model as this kind trains it. Frozen models (no trainable parameter) stay replicated under
        DDP; FSDP2 shards them too (their forward all-gathers layer by layer)."""
        if model is None or self.kind == "none":
            return model
        trainable = any(p.requires_grad for p in model.parameters())
        if self.kind == "ddp":
            if not trainable:
                return model
            ids = [device.index if device.index is not None else torch.cuda.current_device()] \
                if device.type == "cuda" else None
            return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (self.world,))
        blocks = set(getattr(model, "_no_split_modules", None) or ())
        for module in model.modules():
            if type(module).__name__ in blocks:
                fully_shard(module, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model

    @staticmethod
    def unwrap(model):
        return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model

    def generation_kwargs(self) -> dict:
        """FSDP2's forward is a collective: every rank must run the same number of decoding steps."""
        return {"synced_gpus": True} if self.kind == "fsdp2" else {}

    @contextlib.contextmanager
    def micro_batch(self, model, last: bool):
        """Forward + backward of one micro-batch; gradients are synchronised across ranks only on the last."""
        if self.kind == "ddp" and not last and isinstance(model, torch.nn.parallel.DistributedDataParallel):
            with model.no_sync():
                yield
        elif self.kind == "fsdp2" and hasattr(model, "set_requires_gradient_sync"):
            model.set_requires_gradient_sync(last)
            try:
                yield
            finally:
                model.set_requires_gradient_sync(True)
        else:
            yield

    @property
    def grad_scale(self) -> float:
        """DDP and FSDP2 average gradients over ranks; the losses are already shares of the global loss."""
        return float(self.world)

    def clip_grad_norm_(self, params, max_norm: float) -> torch.Tensor:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    # ------------------------------------------------------------------ data
    def local_rows(self, n: int) -> slice:
        """This rank's contiguous share of n rows (n divisible by the world size)."""
        k = n // self.world
        return slice(self.rank * k, (self.rank + 1) * k)

    def all_reduce_sum(self, x: torch.Tensor) -> torch.Tensor:
        if self.world == 1:
            return x
        y = x.detach().cpu() if dist.get_backend() == "gloo" else x.detach().clone()
        dist.all_reduce(y)
        return y.to(x.device)

    def all_gather_rows(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's x along dim 0, in rank order (equal shapes on every rank)."""
        if self.world == 1:
            return x
        src = x.cpu() if dist.get_backend() == "gloo" else x.contiguous()
        parts = [torch.empty_like(src) for _ in range(self.world)]
        dist.all_gather(parts, src.contiguous())
        return torch.cat(parts).to(x.device)

    def all_gather_varlen(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's 1-D x in rank order, lengths free (padded to the longest for the
        collective, then trimmed)."""
        if self.world == 1:
            return x
        n = self.all_gather_rows(torch.tensor([x.numel()], dtype=torch.int64, device=x.device)).tolist()
        padded = torch.zeros(max(n), dtype=x.dtype, device=x.device)
        padded[:x.numel()] = x
        parts = self.all_gather_rows(padded).view(self.world, max(n))
        return torch.cat([parts[r, :n[r]] for r in range(self.world)])

    def gather_rollout(self, ro):
        """Every tensor field of a Rollout with a batch dimension, gathered over ranks; the kept sets
        (kept_rows.KeptRows: [B, R] counts, ids of any length) too."""
        for name, value in list(ro.__dict__.items()):
            if isinstance(value, torch.Tensor) and value.dim() >= 1:
                setattr(ro, name, self.all_gather_rows(value))
            elif isinstance(value, KeptRows) and self.world > 1:
                setattr(ro, name, KeptRows(self.all_gather_varlen(value.ids), self.all_gather_rows(value.counts),
                                           value.vocab_size))
        return ro

    # ------------------------------------------------------------------ checkpoints
    def full_state_dict(self, model) -> dict | None:
        """FSDP2: the unsharded weights on rank 0 (CPU; a collective: every rank calls it)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def savable(self, model):
        """What checkpoint.save writes for `model`: itself (single process), the DDP module, or under FSDP2 a
        stand-in whose save_pretrained writes the gathered full state dict (collective, called on every rank)."""
        if model is None or self.kind == "none":
            return model
        if self.kind == "ddp":
            return self.unwrap(model)
        return _FullWeights(model, self.full_state_dict(model))

    def optimizer_state(self, model, opt) -> dict:
        if self.kind != "fsdp2":
            return opt.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_optimizer_state(self, model, opt, state: dict):
        by_name = bool(state.get("state")) and isinstance(next(iter(state["state"])), str)
        if by_name != (self.kind == "fsdp2"):
            raise ValueError("the checkpoint's optimiser state was written by a "
                             f"{'--parallel fsdp2' if by_name else 'single-process or --parallel ddp'} run; "
                             f"resume it with the same kind (this run: --parallel {self.kind})")
        if self.kind != "fsdp2":
            opt.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, opt, state, options=StateDictOptions(full_state_dict=True))

    def barrier(self):
        if self.world > 1:
            dist.barrier()


class _FullWeights:
    """save_pretrained of an FSDP2 model from its gathered full state dict (rank 0 writes)."""

    def __init__(self, model, state_dict):
        self.model, self.state_dict = model, state_dict

    def save_pretrained(self, path, **kwargs):
        self.model.save_pretrained(path, state_dict=self.state_dict, **kwargs)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------- world-size independent sampling
_M1, _M2 = -4658895280553007687, -7723592293110705685      # splitmix64 multipliers as signed int64
_GOLDEN = -7046029254386353131


def _srl(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser (a bijection of 64-bit words; int64 arithmetic wraps)."""
    x = x + _GOLDEN
    x = (x ^ _srl(x, 30)) * _M1
    x = (x ^ _srl(x, 27)) * _M2
    return x ^ _srl(x, 31)


def counter_uniform(seed: int, rows: torch.Tensor, step: int, vocab: int) -> torch.Tensor:
    """Uniform (0, 1) float64 [len(rows), vocab], a pure function of (seed, row, step, token id)."""
    base = _mix(torch.tensor(seed & ((1 << 63) - 1), dtype=torch.int64, device=rows.device))
    h = _mix(_mix(base + rows.to(torch.int64)) + step)[:, None]
    h = _mix(h + torch.arange(vocab, dtype=torch.int64, device=rows.device)[None, :])
    return _srl(h, 11).to(torch.float64) * 2.0**-53 + 2.0**-54


class CounterSampler(LogitsProcessor):
    """A LogitsProcessor for greedy decoding that turns it into exact sampling from softmax(z / T) restricted to
    the kept set of min-p / top-k / top-p (vLLM V1's order and ties, fastppo.kept_filters; off by default): the
    Gumbel-max trick, argmax(processed + g) with processed = z / T (-inf outside the kept set) and
    g = -log(-log u), u from counter_uniform keyed by the GLOBAL row index, the decoding step and the token id.
    A row's response therefore does not depend on the batch it is decoded in, the world size, or any global
    RNG state. `log_softmax(processed(z))` at the chosen token is the sampler's log-prob of it, `kept(z)` the
    kept set it drew from."""

    def __init__(self, seed: int, rows: torch.Tensor, prompt_len: int, temperature: float, top_k: int = 0,
                 top_p: float = 1.0, min_p: float = 0.0):
        self.seed, self.rows, self.prompt_len, self.inv_tau = seed, rows, prompt_len, 1.0 / temperature
        self.temperature, self.top_k, self.top_p, self.min_p = temperature, top_k, top_p, min_p

    @property
    def filters(self) -> bool:
        """Whether a filter is on (else the kept set is the whole vocabulary)."""
        return bool(self.top_k) or self.top_p < 1.0 or self.min_p > 0.0

    def kept(self, scores: torch.Tensor) -> torch.Tensor | None:
        """bool [B, V]: the ids the sampler keeps for these raw logits (None: no filter, every id)."""
        if not self.filters:
            return None
        from ..kept_filters import kept_mask_from_filters

        return kept_mask_from_filters(scores.float(), temperature=self.temperature, top_k=self.top_k or None,
                                      top_p=self.top_p if self.top_p < 1 else None,
                                      min_p=self.min_p if self.min_p > 0 else None)

    def processed(self, scores: torch.Tensor, kept: torch.Tensor | None = None) -> torch.Tensor:
        """float64 z / T, -inf outside the kept set (`kept`: the mask of `kept(scores)` if already formed)."""
        z = scores.to(torch.float64) * self.inv_tau
        kept = self.kept(scores) if kept is None else kept
        return z if kept is None else z.masked_fill(~kept, float("-inf"))

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        step = input_ids.shape[1] - self.prompt_len
        u = counter_uniform(self.seed, self.rows.to(scores.device), step, scores.shape[1])
        return self.processed(scores) - torch.log(-torch.log(u))
