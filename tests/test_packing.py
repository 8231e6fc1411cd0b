"""Packing for causal LM: no token discarded at prepare, no attention or loss across a
document at batch time (tiny Llama from a config, CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from scilm_hpc.data import packing
from scilm_hpc.data.encode import encode_documents
from scilm_hpc.data.packing import pack_documents
from scilm_hpc.tasks import get_task

from .conftest import REPO, scilm_run

PREPARE = str(REPO / "jobs" / "prepare.yaml")
TASK = get_task("causal_lm")


def tiny_llama(attn: str = "sdpa", vocab: int = 97) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        attn_implementation=attn,
    )
    return LlamaForCausalLM(config).eval()


def documents(lengths: list[int], vocab: int = 97, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, size=n).astype(np.int32) for n in lengths]


def packed_batch(docs: list[np.ndarray], block: int) -> dict[str, torch.Tensor]:
    ids, positions, _ = pack_documents(docs, block)
    items = [{"input_ids": i, "position_ids": p} for i, p in zip(ids, positions, strict=True)]
    return TASK.collate(items, pad_id=0)


# --- blocks ----------------------------------------------------------------------------


def test_pack_documents_keeps_every_token_in_order():
    docs = documents([5, 12, 1, 7, 30])
    ids, positions, split = pack_documents(docs, 8)
    assert [len(b) for b in ids] == [8, 8, 8, 8, 8, 8, 7]  # 55 tokens, only the last is short
    assert np.array_equal(np.concatenate(ids), np.concatenate(docs))
    # positions restart at every document and every block
    flat = np.concatenate(positions)
    expected = np.concatenate([np.arange(n) for n in (5, 3, 8, 1, 1, 6, 1, 7, 8, 8, 7)])
    assert np.array_equal(flat, expected)
    assert split == 3  # the documents of 12, 7 and 30 tokens cross block boundaries
    assert pack_documents([], 8) == ([], [], 0)


def test_collate_masks_padding_and_document_starts():
    batch = packed_batch(documents([3, 4, 2]), 6)  # blocks: [3 + 3 of 4], [1 of 4, 2]
    assert batch["input_ids"].shape == (2, 6)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2], [0, 0, 1, 0, 1, 2]]
    first_targets = (batch["labels"] != -100).tolist()
    assert first_targets == [
        [False, True, True, False, True, True],
        [False, False, True, False, False, False],  # 3 tokens of padding after 3 real ones
    ]


# --- no attention and no loss across a document -----------------------------------------


def opt_model(attn: str) -> torch.nn.Module:
    """OPT: learned absolute positions (offset 2), and a mask code that ignores position ids."""
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    config = OPTConfig(
        vocab_size=97,
        hidden_size=32,
        num_hidden_layers=2,
        ffn_dim=64,
        num_attention_heads=2,
        max_position_embeddings=64,
        word_embed_proj_dim=32,
        attn_implementation=attn,
    )
    return OPTForCausalLM(config).eval()


def gpt2_model(attn: str) -> torch.nn.Module:
    """GPT-2: learned absolute positions from 0."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=97, n_embd=32, n_layer=2, n_head=2, n_positions=64, attn_implementation=attn
    )
    return GPT2LMHeadModel(config).eval()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", ["llama", "opt", "gpt2"])
def test_packed_logits_equal_each_document_alone(family, attn):
    model = {"llama": tiny_llama, "opt": opt_model, "gpt2": gpt2_model}[family](attn)
    docs = documents([9, 14, 9, 20])
    batch = packed_batch(docs, 32)  # one block of 3 documents, one of 20 tokens + padding
    inputs = TASK.model_inputs(batch, model)
    assert inputs["use_cache"] is False and inputs["attention_mask"].dim() == 4
    with torch.no_grad():
        packed = model(**inputs).logits
        alone = [model(input_ids=torch.from_numpy(d).long()[None]).logits[0] for d in docs]
    flat = torch.cat([packed[0, :32], packed[1, :20]])
    torch.testing.assert_close(flat, torch.cat(alone), rtol=1e-4, atol=1e-5)


def test_the_varlen_path_of_flash_attention_keeps_documents_apart(monkeypatch):
    """What flash / flex attention get (position ids, no mask), checked through
    transformers' own packed-sequence mask of Llama under SDPA."""
    monkeypatch.setattr(packing, "attention_implementation", lambda model: "flash_attention_2")
    model = tiny_llama()
    docs = documents([9, 14, 9, 20])
    inputs = TASK.model_inputs(packed_batch(docs, 32), model)
    assert inputs["attention_mask"] is None
    with torch.no_grad():
        packed = model(**inputs).logits
        alone = [model(input_ids=torch.from_numpy(d).long()[None]).logits[0] for d in docs]
    flat = torch.cat([packed[0, :32], packed[1, :20]])
    torch.testing.assert_close(flat, torch.cat(alone), rtol=1e-4, atol=1e-5)


def test_bf16_autocast_takes_the_mask():
    model = tiny_llama()
    inputs = TASK.model_inputs(packed_batch(documents([9, 14, 9, 20]), 32), model)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(model(**inputs).loss)


def test_the_cache_trap_is_real():
    """Control: passed a 2D mask (or left with its cache on), the model lets the second
    document attend to the first, which the test above would catch."""
    model = tiny_llama()
    docs = documents([9, 14])
    batch = packed_batch(docs, 32)
    with torch.no_grad():
        leaky = model(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=True
        ).logits
        alone = model(input_ids=torch.from_numpy(docs[1]).long()[None]).logits[0]
    assert (leaky[0, 9:23] - alone).abs().max() > 1e-2


def test_packed_loss_with_a_split_document_is_the_weighted_loss_of_its_parts():
    """A document cut by a block boundary counts as two documents: its continuation is
    not predicted from the part in the previous block."""
    model = tiny_llama()
    docs = documents([9, 14, 5, 20, 3])
    ids, positions, split = pack_documents(docs, 24)  # blocks 9+14+1 | 4+20 | 3
    assert split == 1
    batch = packed_batch(docs, 24)
    parts = np.split(np.concatenate(docs), np.flatnonzero(np.concatenate(positions) == 0)[1:])
    assert [len(p) for p in parts] == [9, 14, 1, 4, 20, 3]
    with torch.no_grad():
        packed = model(**TASK.model_inputs(batch, model)).loss.item()
        total, targets = 0.0, 0
        for part in parts:
            if len(part) > 1:
                ids_ = torch.from_numpy(part).long()[None]
                total += model(input_ids=ids_, labels=ids_).loss.item() * (len(part) - 1)
                targets += len(part) - 1
    assert int((batch["labels"] != -100).sum()) == targets == 51 - 6
    assert packed == pytest.approx(total / targets, rel=1e-5)


def test_packed_loss_matches_exactly_when_no_document_is_split():
    model = tiny_llama()
    docs = documents([9, 14, 5, 20])  # 28 | 20 with blocks of 28: nothing split
    ids, positions, split = pack_documents(docs, 28)
    assert split == 0 and [len(b) for b in ids] == [28, 20]
    batch = packed_batch(docs, 28)
    with torch.no_grad():
        packed = model(**TASK.model_inputs(batch, model)).loss.item()
        rows = [torch.from_numpy(d).long()[None] for d in docs]
        losses = [model(input_ids=row, labels=row).loss.item() for row in rows]
    weights = [len(d) - 1 for d in docs]
    assert packed == pytest.approx(np.dot(losses, weights) / sum(weights), rel=1e-5)


# --- prepare -----------------------------------------------------------------------------


def lines(n: int) -> list[str]:
    words = "protein binding assay cells expression gene tumor growth inhibitor receptor".split()
    return [
        " ".join(words[(i * 7 + j) % len(words)] for j in range(3 + (i * 5) % 40)) for i in range(n)
    ]


def prepare_text(scilm, tmp_path: Path, minilm_path: str, *overrides: str) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    corpus = tmp_path / "train.txt"
    corpus.write_text("\n".join(lines(50)) + "\n", encoding="utf-8")
    code, _, err = scilm(
        "prepare",
        PREPARE,
        "cluster=none",
        "task=causal_lm",
        "data.format=text",
        f"run.dir={tmp_path}",
        f"data.train={corpus}",
        f"model.name_or_path={minilm_path}",
        "data.max_length=32",
        "data.examples_per_shard=20",
        *overrides,
    )
    assert code == 0, err
    return tmp_path / "shards"


def stored(shards: Path, column: str = "input_ids") -> np.ndarray:
    files = sorted((shards / "train").glob("shard-*.h5"))
    with_column = []
    for f in files:
        with h5py.File(f) as fh:
            with_column.append(fh[column][()])
    return np.concatenate(with_column)


def test_prepare_packs_without_discarding_a_token(scilm, tmp_path, minilm_path):
    from transformers import AutoTokenizer

    shards = prepare_text(scilm, tmp_path, minilm_path)
    manifest = json.loads((shards / "manifest.json").read_text())
    train = manifest["splits"]["train"]
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    whole = encode_documents(tokenizer, lines(50))
    n_in = sum(len(d) for d in whole)
    assert max(len(d) for d in whole) > 32  # some documents are longer than a block
    assert train["documents"] == 50
    assert train["tokens_in"] == train["tokens_kept"] == train["n_tokens"] == n_in
    assert train["tokens_truncated"] == 0 and train["documents_split"] > 0
    assert manifest["data"]["packing"] is True
    assert np.array_equal(stored(shards), np.concatenate(whole))
    # each document ends with [SEP] (MiniLM has no EOS) and its positions restart at 0
    assert all(d[-1] == tokenizer.sep_token_id for d in whole)
    positions = stored(shards, "token_position_ids")
    assert int((positions == 0).sum()) >= 50
    # 3 shards of 20, 20, 10 documents: blocks of 32, only each shard's last one shorter
    from scilm_hpc.data.dataset import ShardDataset

    lengths = ShardDataset(shards, "train").lengths()
    assert len(train["shards"]) == 3 and (lengths[lengths != 32].size <= 3)
    item = ShardDataset(shards, "train")[0]
    assert set(item) == {"input_ids", "position_ids"}


def test_prepare_without_packing_counts_the_cut_tokens(scilm, tmp_path, minilm_path):
    from transformers import AutoTokenizer

    shards = prepare_text(scilm, tmp_path, minilm_path, "data.packing=false")
    train = json.loads((shards / "manifest.json").read_text())["splits"]["train"]
    whole = encode_documents(AutoTokenizer.from_pretrained(minilm_path), lines(50))
    n_in = sum(len(d) for d in whole)
    kept = sum(min(len(d), 32) for d in whole)
    assert train["n_examples"] == 50
    assert train["tokens_in"] == n_in and train["tokens_kept"] == train["n_tokens"] == kept
    assert train["tokens_truncated"] == n_in - kept > 0
    assert train["documents_truncated"] == sum(len(d) > 32 for d in whole)


def test_shards_without_positions_still_train_one_document_per_row(scilm, tmp_path, minilm_path):
    """Shards from before packing (no position column) read and collate as before."""
    from scilm_hpc.data.dataset import ShardDataset

    shards = prepare_text(scilm, tmp_path, minilm_path, "data.packing=false")
    data = ShardDataset(shards, "train")
    assert "token_position_ids" not in data.shard(0).columns
    batch = TASK.collate([data[0], data[1]], pad_id=0)
    assert "position_ids" not in batch
    assert TASK.model_inputs(batch, None).keys() == {"input_ids", "attention_mask", "labels"}


@pytest.mark.timeout(300)
def test_packed_prepare_on_two_ranks_equals_one(scilm, tmp_path, minilm_path):
    """Packing is per shard, so two ranks write the same files, and manifest, as one."""
    one = prepare_text(scilm, tmp_path / "one", minilm_path)
    corpus = tmp_path / "one" / "train.txt"
    two = scilm_run(
        "prepare",
        PREPARE,
        "cluster=local",
        "cluster.tasks_per_node=2",
        "task=causal_lm",
        "data.format=text",
        f"run.dir={tmp_path / 'two'}",
        f"data.train={corpus}",
        f"model.name_or_path={minilm_path}",
        "data.max_length=32",
        "data.examples_per_shard=20",
    )
    assert two.returncode == 0, two.stderr[-3000:]
    manifests = [
        json.loads((root / "manifest.json").read_text())["splits"]
        for root in (one, tmp_path / "two" / "shards")
    ]
    assert manifests[0] == manifests[1]  # shard checksums and token counts included
