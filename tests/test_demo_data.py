"""The real dataset shipped for the demo (data/antibody-vgene/): readable by the JSONL
reader, the documented sizes and classes, its licence and source beside it."""

from __future__ import annotations

from collections import Counter

from scilm_hpc.data.readers import read_jsonl

from .conftest import REPO

DATA = REPO / "data" / "antibody-vgene"
FAMILIES = {"IGHV1", "IGHV3", "IGHV4", "IGKV1", "IGKV3", "IGLV1", "IGLV2", "IGLV3"}


def test_the_demo_data_is_what_its_readme_says():
    sizes = {}
    for split in ("train", "dev", "test"):
        examples = read_jsonl(DATA / f"{split}.jsonl", "text", "label")
        sizes[split] = len(examples)
        labels = Counter(ex.label for ex in examples)
        assert set(labels) == FAMILIES, (split, labels)
        for ex in examples:
            residues = ex.text.split(" ")
            assert 97 <= len(residues) <= 138 and all(len(r) == 1 for r in residues)
    assert sizes == {"train": 652, "dev": 82, "test": 83}
    readme = (DATA / "README.md").read_text()
    assert "Apache License 2.0" in readme and "alchemab/antiberta" in readme
    assert "Apache License" in (DATA / "LICENSE").read_text()
    assert sum(p.stat().st_size for p in DATA.iterdir()) < 1_000_000
