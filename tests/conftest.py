"""Shared fixtures: tiny models made on the fly (no downloads), corpus writers, CLI runner."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from .prerequisites import REPO, SHARED_DATA, shared_data  # noqa: F401  (tests import them here)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SCILM = str(Path(sys.executable).with_name("scilm"))


# ``scilm`` with a real USR2 sent to itself while the job is still starting (just before
# DeepSpeed forms the process group); it needs no Slurm and no timing from outside.
SIGNAL_IN_START_UP = """
import os, signal, sys
import deepspeed
from scilm_hpc.cli import main

init = deepspeed.init_distributed
def signalled_init(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGUSR2)
    return init(*args, **kwargs)
deepspeed.init_distributed = signalled_init
sys.exit(main(sys.argv[1:]))
"""


def scilm_run(
    *args: str, fault: str | None = None, timeout: int = 300, signal_in_start_up: bool = False
) -> subprocess.CompletedProcess:
    """Run the ``scilm`` console script in a subprocess (``fault``: ``SCILM_FAULT``;
    ``signal_in_start_up``: USR2 while the job starts, for ``cluster=none`` jobs)."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    env.pop("SCILM_FAULT", None)
    if fault:
        env["SCILM_FAULT"] = fault
    command = [sys.executable, "-c", SIGNAL_IN_START_UP] if signal_in_start_up else [SCILM]
    return subprocess.run(
        [*command, *args], capture_output=True, text=True, timeout=timeout, env=env
    )


@pytest.fixture(scope="session")
def minilm_path() -> str:
    """The packaged MiniLM directory."""
    from scilm_hpc.model_source import packaged_minilm_path

    return packaged_minilm_path()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny randomly initialised BERT with MiniLM's tokenizer (same fingerprint); the
    benchmarks build the same one."""
    from benchmarks._common import tiny_bert

    return tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def other_tokenizer_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny BERT whose WordPiece vocabulary differs from MiniLM's."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    out = tmp_path_factory.mktemp("other-bert")
    vocab = (
        ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        + list("abcdefghijklmnopqrstuvwxyz")
        + ["##" + c for c in "abcdefghijklmnopqrstuvwxyz"]
        + [".", ",", "the", "of"]
    )
    (out / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    tokenizer = BertTokenizerFast(vocab_file=str(out / "vocab.txt"))
    tokenizer.save_pretrained(out)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
    )
    BertForSequenceClassification(config).save_pretrained(out)
    return out


@pytest.fixture
def write_jsonl(tmp_path: Path) -> Callable[..., Path]:
    """Write rows as JSONL under tmp_path and return the path."""

    def write(name: str, rows: list[dict]) -> Path:
        path = tmp_path / name
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        return path

    return write


@pytest.fixture
def demo_corpus(tmp_path: Path) -> dict[str, Path]:
    """The synthetic demo corpus, small."""
    from scilm_hpc.data.demo_corpus import write_demo_corpus

    return write_demo_corpus(tmp_path / "corpus", train=90, dev=30, test=30)


@pytest.fixture
def scilm(capsys: pytest.CaptureFixture[str]) -> Callable[..., tuple[int, str, str]]:
    """Run ``scilm ARGS`` in this process; returns (exit status, stdout, stderr)."""
    from scilm_hpc.cli import main

    def run(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return code, out, err

    return run


def prepare_demo_shards(root: Path, model_dir: Path, train: int, dev: int, test: int) -> Path:
    """``scilm prepare`` of a demo corpus of that many examples with ``model_dir``'s
    tokenizer; returns the shards directory."""
    from scilm_hpc.data.demo_corpus import write_demo_corpus

    corpus = write_demo_corpus(root / "corpus", train=train, dev=dev, test=test)
    done = scilm_run(
        "prepare",
        str(REPO / "jobs/prepare.yaml"),
        "cluster=none",
        f"run.dir={root}",
        f"data.train={corpus['train']}",
        f"data.dev={corpus['dev']}",
        f"model.name_or_path={model_dir}",
    )
    assert done.returncode == 0, done.stderr
    return root / "shards"


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """Demo-corpus shards made with the tiny model's tokenizer (once per module)."""
    return prepare_demo_shards(tmp_path_factory.mktemp("ft-data"), tiny_model_dir, 96, 30, 10)


from .protein_fixtures import tiny_protein_bert  # noqa: E402,F401  (protein tests' tiny BERT)
from .slurm_fixtures import slurm_cluster  # noqa: E402,F401  (the `slurm` tier's cluster)
