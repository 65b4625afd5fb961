"""CLIP tokenizers: train a small byte-level BPE one, and check a loaded one is real.

`transformers`' CLIPTokenizer does not raise when its vocabulary files are missing: it returns a
2-token tokenizer that maps every word to the same id. `check_tokenizer` catches that.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from tokenizers import pre_tokenizers

if TYPE_CHECKING:  # imported where used: `transformers` takes seconds to import
    from transformers import CLIPTokenizer, PreTrainedTokenizerBase

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
END_OF_WORD = "</w>"  # CLIP's BPE end-of-word marker
MIN_VOCAB = 2 + 2 * 256  # BOS, EOS, 256 byte symbols, the same 256 with END_OF_WORD


def train_clip_tokenizer(
    texts: Iterable[str], vocab_size: int, max_length: int = 77
) -> CLIPTokenizer:
    """A CLIP-format byte-level BPE tokenizer, trained deterministically.

    Same format as OpenAI's, so it saves with `save_pretrained` and loads with
    `CLIPTokenizer.from_pretrained`: CLIP's
    normaliser and pre-tokeniser, ids 0/1 = BOS/EOS, then the 256 byte symbols, the same with
    `</w>`, then one token per merge. Unlike the `tokenizers` trainer, whose ties between equally
    frequent pairs depend on hash order (two runs give different ids), ties here go to the
    lexicographically smallest pair, so the same texts always give the same tokenizer.
    """
    from transformers import CLIPTokenizer

    backend = CLIPTokenizer()._tokenizer
    counts: dict[str, int] = {}
    for text in texts:
        pieces = backend.pre_tokenizer.pre_tokenize_str(backend.normalizer.normalize_str(text))
        for word, _ in pieces:
            counts[word] = counts.get(word, 0) + 1
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = [BOS, EOS, *alphabet, *(symbol + END_OF_WORD for symbol in alphabet)]
    words = {word: [*word[:-1], word[-1] + END_OF_WORD] for word in sorted(counts)}
    merges: list[tuple[str, str]] = []
    while len(vocab) < vocab_size:
        pairs: dict[tuple[str, str], int] = {}
        for word, symbols in words.items():
            for pair in zip(symbols, symbols[1:], strict=False):
                pairs[pair] = pairs.get(pair, 0) + counts[word]
        if not pairs:
            break  # every word is one token
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        vocab.append(best[0] + best[1])
        for word, symbols in words.items():
            words[word] = _merge(symbols, best)
    return CLIPTokenizer(
        vocab={token: i for i, token in enumerate(vocab)},
        merges=merges,
        model_max_length=max_length,
    )


def _merge(symbols: list[str], pair: tuple[str, str]) -> list[str]:
    merged, i = [], 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            merged.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            merged.append(symbols[i])
            i += 1
    return merged


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
