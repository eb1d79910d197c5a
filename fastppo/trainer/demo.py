"""The embedded demo: a toy question-answer task in the spirit of the classic RLHF example.

A prompt `[BOS, Q, item, SEP]` asks about one of K items; its right answer is the answer token
`perm[item]`, a fixed permutation. The preference rule ranks responses:
    correct and concise ([answer, EOS])  >  correct but padded with filler  >  wrong.
The ground-truth task score of that rule (1, 0.5, 0) is recorded beside the learned reward, so
reward hacking would be visible. A reward model (Llama + scalar head) is trained with the
Bradley-Terry loss on synthetic preference pairs; the policy starts from a short supervised
warm-up that teaches the answer format with random answers (it knows the format, not the facts).
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F

PAD, BOS, EOS, Q, SEP, FILL = 0, 1, 2, 3, 4, 5
N_ITEMS = 8
ITEM0 = 6
ANS0 = ITEM0 + N_ITEMS
VOCAB = ANS0 + N_ITEMS
PROMPT_LEN = 4
WORDS = ["<pad>", "<s>", "</s>", "Q", "SEP", "fill"] + [f"item{i}" for i in range(N_ITEMS)] + \
    [f"ans{i}" for i in range(N_ITEMS)]


def decode(ids) -> str:
    """Text of demo token ids (so Python reward functions can score demo completions); PAD is dropped."""
    return " ".join(WORDS[int(t)] for t in ids if int(t) != PAD)


class ToyTask:
    def __init__(self, seed: int):
        rng = random.Random(seed)
        perm = list(range(N_ITEMS))
        rng.shuffle(perm)
        self.answer = torch.tensor([ANS0 + p for p in perm])

    # ------------------------------------------------------------------ data
    def prompts(self, n: int, generator: torch.Generator, group_size: int = 1):
        items = torch.randint(0, N_ITEMS, (n // group_size,), generator=generator).repeat_interleave(group_size)
        ids = torch.stack([torch.full_like(items, BOS), torch.full_like(items, Q), ITEM0 + items,
                           torch.full_like(items, SEP)], 1)
        return ids, torch.ones_like(ids)

    def score(self, prompt_ids: torch.Tensor, response: torch.Tensor) -> torch.Tensor:
        """Ground truth: 1 correct and concise, 0.5 correct but padded, 0 wrong (per sequence)."""
        correct = self.answer[prompt_ids[:, 2] - ITEM0]
        out = torch.zeros(response.shape[0])
        for b in range(response.shape[0]):
            toks = response[b].tolist()
            body = toks[: toks.index(EOS)] if EOS in toks else toks
            answers = [t for t in body if ANS0 <= t < VOCAB]
            if len(answers) != 1 or answers[0] != correct[b].item():
                continue
            ended = EOS in toks
            others = [t for t in body if t != answers[0]]
            out[b] = 1.0 if ended and body == answers else (0.5 if ended and all(t == FILL for t in others) else 0.0)
        return out

    def _response(self, kind: str, item: int, rng: random.Random):
        right = int(self.answer[item])
        wrong = ANS0 + rng.choice([a for a in range(N_ITEMS) if ANS0 + a != right])
        if kind == "concise":
            return [right, EOS]
        if kind == "padded":
            return rng.choice([[right, FILL, EOS], [FILL, right, EOS], [right, FILL, FILL, EOS],
                               [FILL, right, FILL, EOS], [FILL, FILL, right, EOS]])
        return rng.choice([[wrong, EOS], [wrong, FILL, EOS], [FILL, wrong, EOS], [FILL, EOS], [EOS],
                           [right, wrong, EOS], [wrong, right, EOS], [FILL, FILL, FILL, FILL],
                           [rng.randrange(ITEM0, VOCAB) for _ in range(4)]])

    def preference_pairs(self, n: int, rng: random.Random):
        """(chosen, rejected) token sequences [n, PROMPT_LEN + 4], right-padded with PAD."""
        order = ["concise", "padded", "wrong"]
        chosen, rejected = [], []
        for _ in range(n):
            item = rng.randrange(N_ITEMS)
            hi, lo = sorted(rng.sample(range(3), 2))
            prompt = [BOS, Q, ITEM0 + item, SEP]
            for kind, bucket in ((order[hi], chosen), (order[lo], rejected)):
                seq = prompt + self._response(kind, item, rng)
                bucket.append(seq + [PAD] * (PROMPT_LEN + 4 - len(seq)))
        return torch.tensor(chosen), torch.tensor(rejected)

    def format_examples(self, n: int, rng: random.Random):
        """Warm-up data: the answer format with a uniformly random answer token."""
        seqs = []
        for _ in range(n):
            item = rng.randrange(N_ITEMS)
            ans = ANS0 + rng.randrange(N_ITEMS)
            resp = rng.choice([[ans, EOS], [ans, FILL, EOS], [FILL, ans, EOS]])
            seq = [BOS, Q, ITEM0 + item, SEP] + resp
            seqs.append(seq + [PAD] * (PROMPT_LEN + 4 - len(seq)))
        return torch.tensor(seqs)


    def answer_examples(self, n: int, rng: random.Random):
        """The distillation demo's teacher data: prompts with their right, concise answer [n, PROMPT_LEN + 2]."""
        items = [rng.randrange(N_ITEMS) for _ in range(n)]
        return torch.tensor([[BOS, Q, ITEM0 + i, SEP, int(self.answer[i]), EOS] for i in items])


def tokenizer():
    """The demo's word-level tokenizer (WORDS, whitespace-separated, no special tokens added): saved beside every
    demo policy, so a demo checkpoint loads like any Hugging Face model (`--policy checkpoint-N/policy`)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token=WORDS[FILL]))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=WORDS[BOS], eos_token=WORDS[EOS],
                                   pad_token=WORDS[PAD], unk_token=WORDS[FILL])


def tiny_llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=16,
                       bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, tie_word_embeddings=False)


def build_models(seed: int):
    """Fresh tiny policy, reward model and critic (the critic shares no weights with the policy)."""
    from transformers import LlamaForCausalLM, LlamaForSequenceClassification, LlamaForTokenClassification

    cfg = tiny_llama_config()
    torch.manual_seed(seed)
    policy = LlamaForCausalLM(cfg)
    reward = LlamaForSequenceClassification(cfg.__class__(**{**cfg.to_dict(), "num_labels": 1}))
    critic = LlamaForTokenClassification(cfg.__class__(**{**cfg.to_dict(), "num_labels": 1}))
    return policy, reward, critic


def train_reward_model(task: ToyTask, reward, steps: int, seed: int, lr: float = 1e-3, batch: int = 64):
    """Bradley-Terry: minimise -log sigmoid(r(chosen) - r(rejected)). Returns held-out accuracy."""
    rng = random.Random(seed + 1)
    opt = torch.optim.AdamW(reward.parameters(), lr=lr)
    reward.train()
    for _ in range(steps):
        chosen, rejected = task.preference_pairs(batch, rng)
        r = reward(input_ids=torch.cat([chosen, rejected]), attention_mask=(torch.cat([chosen, rejected]) != PAD)
                   .long()).logits[:, 0]
        loss = -F.logsigmoid(r[:batch] - r[batch:]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    reward.eval()
    with torch.no_grad():
        chosen, rejected = task.preference_pairs(512, random.Random(seed + 2))
        rc = reward(input_ids=chosen, attention_mask=(chosen != PAD).long()).logits[:, 0]
        rr = reward(input_ids=rejected, attention_mask=(rejected != PAD).long()).logits[:, 0]
    return (rc > rr).float().mean().item()


def warm_up_policy(task: ToyTask, policy, steps: int, seed: int, lr: float = 3e-3, batch: int = 64):
    """Supervised warm-up on the answer format (random answers): cross-entropy on response tokens."""
    _supervised(policy, lambda rng: task.format_examples(batch, rng), steps, random.Random(seed + 3), lr)


def train_teacher(task: ToyTask, teacher, steps: int, seed: int, lr: float = 3e-3, batch: int = 64) -> float:
    """The distillation demo's teacher: supervised on the right, concise answers (cross-entropy on the response
    tokens). Returns its greedy accuracy on the 8 items (the right answer token first)."""
    _supervised(teacher, lambda rng: task.answer_examples(batch, rng), steps, random.Random(seed + 4), lr)
    with torch.no_grad():
        items = torch.arange(N_ITEMS)
        prompts = torch.stack([torch.full_like(items, BOS), torch.full_like(items, Q), ITEM0 + items,
                               torch.full_like(items, SEP)], 1)
        first = teacher(input_ids=prompts).logits[:, -1].argmax(-1)
    return (first == task.answer).float().mean().item()


def _supervised(model, batches, steps: int, rng: random.Random, lr: float):
    """AdamW steps of cross-entropy on the response tokens of batches(rng) (PAD and the prompt ignored)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        seqs = batches(rng)
        labels = seqs.clone()
        labels[:, :PROMPT_LEN] = -100
        labels[seqs == PAD] = -100
        loss = model(input_ids=seqs, attention_mask=(seqs != PAD).long(), labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
