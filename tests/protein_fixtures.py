"""Protein test helpers: a tiny BERT with an AntiBERTy-style vocabulary (one token per
amino acid, case-sensitive) made on the fly, and the shared protein data sets."""

from __future__ import annotations

from pathlib import Path

import pytest

from .prerequisites import shared_data

AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def protein_bert(out: Path, extra: str = "", layers: int = 2) -> Path:
    """A tiny random BERT whose vocabulary is the special tokens and one token per amino
    acid (plus the letters in ``extra``), saved with its tokenizer in ``out``."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    out.mkdir(parents=True, exist_ok=True)
    vocab = SPECIALS + list(AMINO_ACIDS + extra)
    (out / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    tokenizer = BertTokenizer(vocab=str(out / "vocab.txt"), do_lower_case=False)
    tokenizer.save_pretrained(out)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=160,
    )
    BertForSequenceClassification(config).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_protein_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``protein_bert`` without ``X`` in its vocabulary (as AntiBERTy)."""
    return protein_bert(tmp_path_factory.mktemp("protein-bert"))


def shared_dataset(name: str) -> Path:
    """``../shared/data/NAME`` (the one rule of ``tests.prerequisites``)."""
    return shared_data(name)
