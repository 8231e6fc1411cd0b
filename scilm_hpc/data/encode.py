"""Batched tokenization with the model's own fast tokenizer.

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


def encode_words(
    tokenizer: Any, words: Sequence[Sequence[str]], tags: Sequence[Sequence[int]], max_length: int
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Token ids and per-token tag ids for pre-split words (first sub-word tagged)."""
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
        aligned = np.full(len(ids), IGNORE_INDEX, dtype=np.int32)
        previous = None
        for pos, word in enumerate(enc.word_ids(i)):
            if word is not None and word != previous:
                aligned[pos] = tags[i][word]
            previous = word
        ids_out.append(np.asarray(ids, dtype=np.int32))
        tags_out.append(aligned)
    return ids_out, tags_out
