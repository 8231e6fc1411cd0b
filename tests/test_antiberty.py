"""AntiBERTy from its PyPI package as a plain HF directory: it loads with the plain
transformers classes, tokenises one token per residue, keeps the pretrained weights (its
masked-LM head fills in masked residues of a real antibody) and prepare accepts it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from scilm_hpc.errors import UserError

from .conftest import REPO

pytestmark = pytest.mark.integration

# the heavy chain of trastuzumab (Herceptin), variable domain
HEAVY = (
    "EVQLVESGGGLVQPGGSLRLSCAASGFNIKDTYIHWVRQAPGKGLEWVARIYPTNGYTRYADSVKGRFTISADTSKNTAYLQMNSL"
    "RAEDTAVYYCSRWGGDGFYAMDYWGQGTLVTVSS"
)


def antiberty_root() -> Path:
    """The package's ``trained_models`` folder; skips without the package (fails in CI)."""
    from scilm_hpc.model_import import antiberty_package_dir

    try:
        return antiberty_package_dir()
    except UserError as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{exc.problems[0]} (CI=true: make setup installs it)")
        pytest.skip(exc.problems[0])


@pytest.fixture(scope="module")
def antiberty_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from scilm_hpc.model_import import import_antiberty

    antiberty_root()
    return import_antiberty(tmp_path_factory.mktemp("antiberty") / "model")


def test_import_writes_safetensors_config_and_tokenizer(antiberty_dir):
    from safetensors.torch import load_file

    weights = load_file(antiberty_dir / "model.safetensors")
    assert not [k for k in weights if k.startswith("cls.predictions.decoder.")]
    assert "bert.pooler.dense.weight" in weights
    assert sum(v.numel() for v in weights.values()) > 25_000_000
    config = json.loads((antiberty_dir / "config.json").read_text())
    assert config["architectures"] == ["BertForMaskedLM"] and config["vocab_size"] == 25
    packaged = torch.load(
        antiberty_root() / "AntiBERTy_md_smooth" / "pytorch_model.bin",
        map_location="cpu",
        weights_only=True,
    )
    for key, value in weights.items():
        assert torch.equal(value, packaged[key]), key


def test_tokenises_one_token_per_residue(antiberty_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(antiberty_dir)
    assert len(tokenizer) == 25
    ids = tokenizer(" ".join(HEAVY))["input_ids"]
    assert len(ids) == len(HEAVY) + 2
    assert tokenizer.convert_ids_to_tokens(ids[1:-1]) == list(HEAVY)
    assert tokenizer.unk_token_id not in ids


def test_masked_lm_fills_in_masked_residues(antiberty_dir):
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(antiberty_dir)
    model = AutoModelForMaskedLM.from_pretrained(antiberty_dir).eval()
    assert model.cls.predictions.decoder.weight.data_ptr() == (
        model.bert.embeddings.word_embeddings.weight.data_ptr()
    )
    enc = tokenizer(" ".join(HEAVY), return_tensors="pt")
    positions = list(range(5, len(HEAVY), 6))  # every sixth residue, one at a time
    masked = enc["input_ids"].repeat(len(positions), 1)
    for row, pos in enumerate(positions):
        masked[row, pos + 1] = tokenizer.mask_token_id
    with torch.no_grad():
        logits = model(
            input_ids=masked, attention_mask=enc["attention_mask"].repeat(len(positions), 1)
        ).logits
    predicted = [
        tokenizer.convert_ids_to_tokens(int(logits[row, pos + 1].argmax()))
        for row, pos in enumerate(positions)
    ]
    right = sum(p == HEAVY[pos] for p, pos in zip(predicted, positions, strict=True))
    assert right / len(positions) > 0.6, (right, len(positions))  # chance: about 1 in 20


def test_sequence_and_token_heads_load_with_the_pretrained_encoder(antiberty_dir):
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification

    packaged = torch.load(
        antiberty_root() / "AntiBERTy_md_smooth" / "pytorch_model.bin",
        map_location="cpu",
        weights_only=True,
    )
    seq = AutoModelForSequenceClassification.from_pretrained(
        antiberty_dir, num_labels=1, problem_type="regression"
    )
    assert torch.equal(seq.bert.pooler.dense.weight, packaged["bert.pooler.dense.weight"])
    tok = AutoModelForTokenClassification.from_pretrained(antiberty_dir, num_labels=2)
    assert torch.equal(
        tok.bert.encoder.layer[7].output.dense.weight,
        packaged["bert.encoder.layer.7.output.dense.weight"],
    )


def test_cli_import_and_prepare_accepts_it(scilm, tmp_path, antiberty_dir, write_jsonl):
    code, out, err = scilm("import-model", "antiberty", tmp_path / "ab")
    assert code == 0, err
    assert (tmp_path / "ab" / "model.safetensors").is_file()
    code, _, err = scilm("import-model", "antiberty", tmp_path / "ab")
    assert code == 2 and "exists and is not empty" in err
    code, _, err = scilm("import-model", "esm", tmp_path / "esm")
    assert code == 2 and "allowed: antiberty" in err

    train = write_jsonl(
        "train.jsonl",
        [{"sequence": HEAVY, "label": 1.0}, {"sequence": HEAVY[:-3].lower(), "label": 2.0}],
    )
    common = (
        "cluster=none",
        "task=regression",
        f"data.train={train}",
        "data.text_field=sequence",
        "data.max_length=160",
        f"model.name_or_path={tmp_path / 'ab'}",
    )
    code, _, err = scilm(
        "prepare",
        REPO / "jobs/prepare.yaml",
        *common,
        f"run.dir={tmp_path / 'p'}",
        "data.residue_separator=' '",
    )
    assert code == 0, err
    # without separating residues the tokenizer would see one unknown word: refused
    code, _, err = scilm(
        "prepare",
        REPO / "jobs/prepare.yaml",
        *common,
        f"run.dir={tmp_path / 'q'}",
        "data.residue_separator=''",
    )
    assert code == 2 and "try data.residue_separator=' '" in err
