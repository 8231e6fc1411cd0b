"""Batched tokenization with the model's own tokenizer.

Fast (Rust) tokenizers tokenise whole batches and give each token's word; Python
("slow") tokenizers such as ESM's ``EsmTokenizer``, which has no fast version, get
the same alignment by tokenising word by word.

Token classification aligns word tags to sub-word tokens: the first sub-word of
a word carries the tag, the other sub-words and the special tokens get
``IGNORE_INDEX`` so the loss and the metrics skip them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

IGNORE_INDEX = -100


def encode_texts(tokenizer: Any, texts: Sequence[str], max_length: int) -> list[np.ndarray]:
    """Token ids (int32) of each text, truncated to ``max_length``, with special tokens."""
    enc = tokenizer(
        list(texts),
        truncation=True,
        max_length=max_length,
        return_attention_mask=False,
        return_token_type_ids=False,
    )
    return [np.asarray(ids, dtype=np.int32) for ids in enc["input_ids"]]


def end_of_document_id(tokenizer: Any) -> int | None:
    """The token that ends a document: the tokenizer's EOS, else its SEP (BERT-style
    vocabularies), else None."""
    for token_id in (tokenizer.eos_token_id, getattr(tokenizer, "sep_token_id", None)):
        if token_id is not None:
            return int(token_id)
    return None


def encode_documents(tokenizer: Any, texts: Sequence[str]) -> list[np.ndarray]:
    """Token ids (int32) of each whole text, never truncated, with the tokenizer's special
    tokens and ending in the end-of-document token (appended where the special tokens do
    not already end with it)."""
    enc = tokenizer(
        list(texts),
        truncation=False,
        return_attention_mask=False,
        return_token_type_ids=False,
        verbose=False,  # whole documents may exceed the model's length: packing splits them
    )
    eos = end_of_document_id(tokenizer)
    out = []
    for ids in enc["input_ids"]:
        if eos is not None and (not ids or ids[-1] != eos):
            ids = [*ids, eos]
        out.append(np.asarray(ids, dtype=np.int32))
    return out


def _slow_word_ids(
    tokenizer: Any, words: Sequence[str], max_length: int
) -> tuple[list[int], list[int | None]]:
    """Token ids and each token's word (None: a special token) for a Python ("slow")
    tokenizer, which has no ``word_ids``: each word tokenised alone, the pieces
    truncated to what the special tokens leave of ``max_length``, the specials added."""
    pieces = tokenizer(list(words), add_special_tokens=False)["input_ids"] if words else []
    flat = [(token, word) for word, ids in enumerate(pieces) for token in ids]
    flat = flat[: max(0, max_length - tokenizer.num_special_tokens_to_add(pair=False))]
    tokens = [token for token, _ in flat]
    ids = tokenizer.build_inputs_with_special_tokens(tokens)
    special = tokenizer.get_special_tokens_mask(tokens)
    assert len(special) == len(ids) and len(special) - sum(special) == len(flat)
    owners = iter(word for _, word in flat)
    return ids, [None if is_special else next(owners) for is_special in special]


def encode_words(
    tokenizer: Any, words: Sequence[Sequence[str]], tags: Sequence[Sequence[int]], max_length: int
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Token ids and per-token tag ids for pre-split words (first sub-word tagged)."""
    if not getattr(tokenizer, "is_fast", False):
        aligned_pairs = [_slow_word_ids(tokenizer, w, max_length) for w in words]
        return (
            [np.asarray(ids, dtype=np.int32) for ids, _ in aligned_pairs],
            [_aligned(word_ids, t) for (_, word_ids), t in zip(aligned_pairs, tags, strict=True)],
        )
    enc = tokenizer(
        [list(w) for w in words],
        is_split_into_words=True,
        truncation=True,
        max_length=max_length,
        return_attention_mask=False,
        return_token_type_ids=False,
    )
    ids_out: list[np.ndarray] = []
    tags_out: list[np.ndarray] = []
    for i, ids in enumerate(enc["input_ids"]):
        ids_out.append(np.asarray(ids, dtype=np.int32))
        tags_out.append(_aligned(enc.word_ids(i), tags[i]))
    return ids_out, tags_out


def _aligned(word_ids: Sequence[int | None], tags: Sequence[int]) -> np.ndarray:
    """Per-token tag ids: a word's tag on its first token, ``IGNORE_INDEX`` elsewhere."""
    aligned = np.full(len(word_ids), IGNORE_INDEX, dtype=np.int32)
    previous = None
    for pos, word in enumerate(word_ids):
        if word is not None and word != previous:
            aligned[pos] = tags[word]
        previous = word
    return aligned
