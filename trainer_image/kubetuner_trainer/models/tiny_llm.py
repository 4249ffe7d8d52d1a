"""Tiny byte-level tokenizers for the LLM-style text encoders (Qwen2.5-VL, Llama, Phi-3), built locally.

The vocabulary is the 256 byte stand-ins of byte-level BPE (no merges), plus the special tokens a
family's prompt template or pipeline uses, so that any text tokenizes without a download. Used by
the tiny-model builders of the families in ``models/families/`` (tests and benchmarks only).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .tiny import _byte_chars

#: the special tokens of Qwen2.5-VL's chat template and vision markers (QwenImagePipeline's template uses the first three)
QWEN_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                       "<|image_pad|>", "<|video_pad|>")


def byte_vocab() -> dict[str, int]:
    """The 256 byte stand-ins → ids 0‥255."""
    return {c: i for i, c in enumerate(_byte_chars())}


def train_byte_bpe(corpus: Sequence[str], specials: Sequence[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level BPE vocabulary and merges learnt from ``corpus`` (a few template texts): every byte
    stays encodable and the corpus' words become single tokens, as in the real tokenizers."""
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=4096, initial_alphabet=_byte_chars(), special_tokens=list(specials),
                                  show_progress=False)
    backend.train_from_iterator(list(corpus) * 8, trainer)
    model = json.loads(backend.to_str())["model"]
    return model["vocab"], [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]


def write_qwen2_tokenizer(folder: Path, corpus: Sequence[str] = ()) -> dict[str, int]:
    """A ``Qwen2Tokenizer`` (byte-level BPE learnt from ``corpus``) with Qwen's special tokens; returns their ids.

    With the pipeline's prompt template as corpus, the template tokenizes as with the real tokenizer
    (e.g. QwenImagePipeline's 34-token system prefix), so the pipeline's drop index fits.
    """
    from transformers import Qwen2Tokenizer

    vocab, merges = train_byte_bpe(corpus, QWEN_SPECIAL_TOKENS)
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, eos_token="<|im_end|>",
                         pad_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": list(QWEN_SPECIAL_TOKENS[1:])})
    tok.save_pretrained(folder)
    return {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}


def write_fast_bpe_tokenizer(folder: Path, *, bos: str, eos: str, pad: str | None = None,
                             extra: Sequence[str] = (), corpus: Sequence[str] = (), **kwargs: Any) -> dict[str, int]:
    """A ``PreTrainedTokenizerFast`` over byte-level BPE learnt from ``corpus`` (what ``AutoTokenizer`` loads
    for Llama 3 and Phi-3); ``bos`` is prepended to every text, ``extra`` are special tokens. Returns the ids of
    the special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = list(dict.fromkeys([bos, eos, *([pad] if pad else []), *extra]))
    vocab, merges = train_byte_bpe(corpus, specials)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, vocab[bos])])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token=eos, pad_token=pad,
                                  additional_special_tokens=list(extra), **kwargs)
    tok.save_pretrained(folder)
    return {t: vocab[t] for t in specials}
