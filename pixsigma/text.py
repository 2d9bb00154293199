"""Captions -> T5 features: the one encoding that sampling and training share, the check of which words a
tokenizer does not know, and a word-level T5-style tokenizer for closed vocabularies."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

Tensor = torch.Tensor


@torch.no_grad()
def encode_text(tokenizer, encoder: torch.nn.Module, texts: list[str], max_length: int,
                pad_to_max: bool = True) -> tuple[Tensor, Tensor]:
    """T5 features (B, L, C) and attention mask (B, L) of ``texts``, both on the encoder's device, cut at
    ``max_length`` tokens and padded to ``max_length`` (PixArt's sampling and training) or, with
    ``pad_to_max=False``, only to the longest text (a feature cache stores no padding)."""
    tok = tokenizer(texts, padding="max_length" if pad_to_max else "longest", max_length=max_length,
                    truncation=True, add_special_tokens=True, return_tensors="pt")
    device = next(encoder.parameters()).device
    mask = tok.attention_mask.to(device)
    return encoder(input_ids=tok.input_ids.to(device), attention_mask=mask).last_hidden_state, mask


CLEANING_MODULES = ("bs4", "ftfy")  # what diffusers' caption cleaning needs (optional: not pixsigma's requirements)


def preprocess_captions(texts: list[str], clean: bool = False) -> tuple[list[str], list[str]]:
    """(the texts T5 reads, warnings): lower-cased and stripped, as diffusers' PixArt pipelines do; ``clean``:
    diffusers' own caption cleaning (``clean_caption=True``: URLs, HTML, odd punctuation), which needs bs4 and
    ftfy; without them the texts are only lower-cased and stripped and a warning says so, as diffusers does."""
    if not clean:
        return [t.lower().strip() for t in texts], []
    missing = [m for m in CLEANING_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        return ([t.lower().strip() for t in texts],
                [f"clean_caption needs {' and '.join(missing)} (pip install beautifulsoup4 ftfy): prompts were only "
                 "lower-cased and stripped, as diffusers does without them"])
    from diffusers import PixArtSigmaPipeline  # only with the optional cleaning modules installed

    clean_one = PixArtSigmaPipeline._clean_caption  # reads only class attributes: the class stands for an instance
    return [clean_one(PixArtSigmaPipeline, clean_one(PixArtSigmaPipeline, t)) for t in texts], []


def token_lengths(tokenizer, texts: list[str]) -> list[int]:
    """Tokens each text has before any cut (end-of-text token included): above the model's length, it is cut."""
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=True).input_ids]


def unknown_words(tokenizer, text: str) -> list[str]:
    """Words of ``text`` the tokenizer can only map to its unknown token, in order, once each (a closed
    vocabulary such as the demo's would otherwise drop them silently). Words are what the tokenizer's own
    pre-tokenizer splits (words and punctuation runs), else the whitespace-separated parts; lower-cased, as the
    pipeline encodes prompts."""
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None:
        return []
    text = text.lower()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and backend.pre_tokenizer is not None:
        norm = backend.normalizer.normalize_str(text) if backend.normalizer is not None else text
        words = [norm[a:b].strip() for _, (a, b) in backend.pre_tokenizer.pre_tokenize_str(norm)]
    else:
        words = text.split()
    return [w for w in dict.fromkeys(filter(None, words))
            if unk in tokenizer(w, add_special_tokens=False).input_ids]


def word_level_tokenizer(words: Iterable[str], max_length: int | None = None):
    """A T5-style tokenizer over a closed vocabulary: ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2 (T5's ids), then one id
    per word; NFKC and lower-case; splits words and punctuation runs; appends ``</s>``. A small demo world's
    tokenizer, or an in-memory stand-in for T5's SentencePiece model (which would come from a hub)."""
    vocab = {tok: i for i, tok in enumerate(("<pad>", "</s>", "<unk>"))}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()  # \w+ | [^\w\s]+ : words and punctuation runs
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    extra = {"model_max_length": max_length} if max_length else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   **extra)
