"""CLIP tokenizers: train a small byte-level BPE one, and check a loaded one is real.

`transformers`' CLIPTokenizer does not raise when its vocabulary files are missing: it returns a
2-token tokenizer that maps every word to the same id. `check_tokenizer` catches that.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from tokenizers import pre_tokenizers, trainers
from transformers import CLIPTokenizer, PreTrainedTokenizerBase

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def train_clip_tokenizer(
    texts: Iterable[str], vocab_size: int, max_length: int = 77
) -> CLIPTokenizer:
    """Train a byte-level BPE with CLIP's normaliser, pre-tokeniser and `</w>` word ends.

    The result saves with `save_pretrained` and loads with `CLIPTokenizer.from_pretrained`, like
    OpenAI's. Ids 0 and 1 are BOS and EOS (EOS doubles as padding, as in CLIP).
    """
    blank = CLIPTokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS],
        end_of_word_suffix="</w>",
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    blank._tokenizer.train_from_iterator(texts, trainer)
    bpe = json.loads(blank._tokenizer.to_str())["model"]
    return CLIPTokenizer(
        vocab=bpe["vocab"],
        merges=[tuple(pair) for pair in bpe["merges"]],
        model_max_length=max_length,
    )


def check_tokenizer(tokenizer: PreTrainedTokenizerBase, vocab_size: int, source: str) -> None:
    """Raise if `tokenizer` cannot be the one the text tower was trained with.

    Raises:
        RuntimeError: the tokenizer is the silent 2-token fallback, or larger than the embedding.
    """
    size = len(tokenizer)
    if size <= 2 or size > vocab_size:
        raise RuntimeError(
            f"The tokenizer loaded from {source!r} has {size} tokens but the text model has "
            f"{vocab_size} embeddings: its vocabulary files (tokenizer.json, or vocab.json + "
            "merges.txt) are missing or belong to another model. Download them with the weights "
            "(huggingface-cli download <repo>) or copy them into the model directory."
        )
    probe = tokenizer(["red", "blue"])["input_ids"]
    if probe[0] == probe[1]:
        raise RuntimeError(
            f"The tokenizer loaded from {source!r} maps different words to the same ids; its "
            "vocabulary files are broken. Re-download the model's tokenizer files."
        )
