"""Batched tokenization with the model's own fast tokenizer.

Token classification aligns word tags to sub-word tokens: the first sub-word of
a word carries the tag, the other sub-words and the special tokens get
``IGNORE_INDEX`` so the loss and the metrics skip them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from scilm_hpc.data.readers import Example

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


def encode_examples(
    tokenizer: Any,
    examples: Sequence[Example],
    task: str,
    label_ids: dict[str, int],
    max_length: int,
    batch_size: int,
) -> tuple[list[np.ndarray], list[Any]]:
    """Encode examples in batches; returns token ids and labels (per example or per token).

    For ``classification`` the labels are ints, for ``token_classification``
    arrays aligned with the tokens, for ``causal_lm`` an empty list.
    """
    ids: list[np.ndarray] = []
    labels: list[Any] = []
    for start in range(0, len(examples), batch_size):
        batch = examples[start : start + batch_size]
        if task == "token_classification":
            tag_ids = [[label_ids[t] for t in ex.tags or ()] for ex in batch]
            batch_ids, batch_tags = encode_words(
                tokenizer, [ex.words or () for ex in batch], tag_ids, max_length
            )
            ids += batch_ids
            labels += batch_tags
        else:
            ids += encode_texts(tokenizer, [ex.text or "" for ex in batch], max_length)
            if task == "classification":
                labels += [label_ids[ex.label or ""] for ex in batch]
    return ids, labels
