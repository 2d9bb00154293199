"""The demo's frozen text encoder: a word-level T5-style tokenizer and a small T5 encoder.

PixArt cross-attends to frozen T5 features. The demo keeps that interface exactly (a
``transformers`` tokenizer + ``T5EncoderModel`` loaded with ``from_pretrained``) at toy
scale: one token per word of the shapes world (``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2, as T5),
and a 4-layer, d_model 128 encoder trained once so that its features carry the scene.

Its training objective stands in for T5's pre-training: four learned slot queries
attend (one head, like the DiT's cross-attention reads captions) over the encoder's
output and must name each mentioned object's colour and shape, and its size and cell
where the caption says them. The head is thrown away; the encoder is saved frozen.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from tokenizers import pre_tokenizers
from torch import nn
from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

from pixsigma.text import word_level_tokenizer

from .fit import fit
from .world import (
    PALETTE,
    SHAPES,
    SIZES,
    caption_vocabulary,
    long_caption,
    main_objects,
    sample_scene,
    short_caption,
)

MAX_LENGTH = 80  # tokens the demo DiT attends to (PRESETS["demo"].max_tokens)
SLOTS = 4  # objects a caption can name
IGNORE = -100


def build_tokenizer(max_length: int = MAX_LENGTH) -> PreTrainedTokenizerFast:
    """Word-level tokenizer over the world's vocabulary (``pixsigma.text.word_level_tokenizer``)."""
    return word_level_tokenizer(caption_vocabulary(), max_length)


def text_encoder_config(vocab_size: int) -> T5Config:
    """The demo T5: d_model 128 (= PRESETS['demo'].caption_channels), 4 layers, 4 heads, gated-GELU like T5 v1.1."""
    return T5Config(vocab_size=vocab_size, d_model=128, d_kv=32, d_ff=256, num_layers=4, num_heads=4,
                    feed_forward_proj="gated-gelu", dropout_rate=0.0, relative_attention_num_buckets=16,
                    relative_attention_max_distance=64, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
                    is_encoder_decoder=False, use_cache=False, tie_word_embeddings=False)


class SlotProbe(nn.Module):
    """The throwaway training head: slot queries read the features through one attention head, and
    per-token classifiers read each token's own feature."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.queries = nn.Parameter(torch.randn(SLOTS, dim) * 0.02)
        self.kv = nn.Linear(dim, 2 * dim)
        classes = {"colour": len(PALETTE), "shape": len(SHAPES), "size": len(SIZES), "cell": 9}
        self.heads = nn.ModuleDict({f"slot_{k}": nn.Linear(dim, c) for k, c in {"present": 2, **classes}.items()})
        # Per-token heads: each word must know the whole object it belongs to (binds colour, shape, place).
        self.heads.update({f"tok_{k}": nn.Linear(dim, c) for k, c in classes.items()})

    def forward(self, feats: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        k, v = self.kv(feats).chunk(2, dim=-1)  # (B, L, D) each
        att = torch.einsum("sd,bld->bsl", self.queries, k) / k.shape[-1] ** 0.5  # (B, S, L)
        att = att.masked_fill(~mask[:, None, :].bool(), float("-inf")).softmax(-1)
        slots = torch.einsum("bsl,bld->bsd", att, v)  # (B, S, D)
        return {name: head(slots if name.startswith("slot_") else feats)  # (B, S | L, classes)
                for name, head in self.heads.items()}


def _word_owners(text: str, n_named: int, long: bool) -> list[int]:
    """For each word (and punctuation) of a world caption, the index of the object it speaks of, or -1.

    Long captions: preamble, then one sentence per object, then relation sentences about objects
    (0, 1) and (1, 2) ('the X is <relation> the Y'). Short captions: objects joined by 'and'.
    """
    words = [w for w, _ in pre_tokenizers.Whitespace().pre_tokenize_str(text.lower())]
    owners, sentence, obj = [], 0, 0
    if not long:
        for w in words:
            owners.append(-1 if w == "and" else obj)
            obj += w == "and"
        return owners
    start = 0
    for i, w in enumerate(words + ["."]):
        if w != "." or i == len(words):
            continue
        span = words[start:i + 1]
        if sentence == 0:
            owners += [-1] * len(span)
        elif sentence <= n_named:
            owners += [sentence - 1] * len(span)
        else:
            a = sentence - n_named - 1
            cut = span.index("is")
            owners += [a] * cut + [-1] * (len(span) - cut - 4) + [a + 1] * 3 + [-1]
        sentence, start = sentence + 1, i + 1
    return owners


def _caption_batch(rng: np.random.Generator, n: int, long: bool) -> tuple[list[str], dict[str, torch.Tensor]]:
    """Random captions of one style and their targets: per slot (``slot_*``) and per token (``tok_*``),
    IGNORE where the caption does not say."""
    keys = ("colour", "shape", "size", "cell")
    texts: list[str] = []
    slot = {k: torch.full((n, SLOTS), IGNORE, dtype=torch.long) for k in ("present", *keys)}
    per_token: dict[str, list[list[int]]] = {k: [] for k in keys}
    colours = tuple(PALETTE)
    for b in range(n):
        scene = sample_scene(rng)
        text = long_caption(scene) if long else short_caption(scene)
        named = scene.objects if long else main_objects(scene)
        texts.append(text)
        values = [{"colour": colours.index(o.colour), "shape": SHAPES.index(o.shape),
                   "size": SIZES.index(o.size) if long else IGNORE, "cell": o.cell if long else IGNORE}
                  for o in named]
        slot["present"][b] = torch.tensor([int(j < len(named)) for j in range(SLOTS)])
        for j, v in enumerate(values):
            for k in keys:
                slot[k][b, j] = v[k]
        owners = _word_owners(text, len(named), long)
        for k in keys:
            per_token[k].append([values[o][k] if o >= 0 else IGNORE for o in owners] + [IGNORE])  # + </s>
    width = max(len(t) for t in per_token["colour"])
    targets = {f"slot_{k}": v for k, v in slot.items()}
    for k, rows in per_token.items():
        targets[f"tok_{k}"] = torch.tensor([r + [IGNORE] * (width - len(r)) for r in rows])  # (B, L)
    return texts, targets


@dataclass(frozen=True)
class TrainResult:
    model: T5EncoderModel
    metrics: dict


def train_text_encoder(tokenizer: PreTrainedTokenizerFast, steps: int = 1500, seed: int = 0, batch_size: int = 64,
                       lr: float = 2e-3, max_seconds: float | None = None,
                       log: Callable[[str], None] | None = None) -> TrainResult:
    """Train the demo T5 with the slot-probe objective; returns it frozen (eval, no grad) and its probe accuracy.

    Deterministic for a seed unless ``max_seconds`` cuts training short (then ``metrics['steps']`` says where).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    torch.manual_seed(seed)
    rng = np.random.default_rng([7, seed])
    model = T5EncoderModel(text_encoder_config(len(tokenizer.get_vocab())))
    probe = SlotProbe(model.config.d_model)
    params = list(model.parameters()) + list(probe.parameters())
    loss_fn = nn.CrossEntropyLoss(ignore_index=IGNORE)

    def step_loss(step: int) -> torch.Tensor:
        texts, tgt = _caption_batch(rng, batch_size, long=step % 2 == 0)  # one style per batch: little padding
        tok = tokenizer(texts, padding="longest", max_length=MAX_LENGTH, truncation=True, return_tensors="pt")
        feats = model(input_ids=tok.input_ids, attention_mask=tok.attention_mask).last_hidden_state  # (B, L, 128)
        out = probe(feats, tok.attention_mask)
        return sum(loss_fn(out[k].flatten(0, 1), tgt[k].flatten()) for k in out
                   if (tgt[k] != IGNORE).any())  # short captions say no size or cell

    t0 = time.perf_counter()
    model.train()
    done, last = fit(step_loss, torch.optim.AdamW(params, lr=lr, weight_decay=0.01),
                     lambda s: min(1.0, (s + 1) / 100) * max(0.05, 1 - s / steps), steps, "t5", max_seconds, log,
                     clip=1.0)
    model.eval().requires_grad_(False)
    acc = _probe_accuracy(tokenizer, model, probe, np.random.default_rng([8, seed]))
    metrics = {"steps": done, "seconds": round(time.perf_counter() - t0, 1), "final_loss": round(last, 4),
               "probe_accuracy": acc, "params": sum(p.numel() for p in model.parameters())}
    return TrainResult(model, metrics)


@torch.no_grad()
def _probe_accuracy(tokenizer: PreTrainedTokenizerFast, model: T5EncoderModel, probe: SlotProbe,
                    rng: np.random.Generator, n: int = 512) -> dict[str, float]:
    """Held-out accuracy of the throwaway probe per attribute (how much scene the features carry)."""
    probe.eval()
    hits: dict[str, list[torch.Tensor]] = {}
    for long in (True, False):
        texts, tgt = _caption_batch(rng, n // 2, long)
        tok = tokenizer(texts, padding="longest", max_length=MAX_LENGTH, truncation=True, return_tensors="pt")
        out = probe(model(input_ids=tok.input_ids, attention_mask=tok.attention_mask).last_hidden_state,
                    tok.attention_mask)
        for k, logits in out.items():
            keep = tgt[k] != IGNORE
            hits.setdefault(k, []).append(logits.argmax(-1)[keep] == tgt[k][keep])
    return {k: round(float(torch.cat(v).float().mean()), 4) for k, v in hits.items()}
