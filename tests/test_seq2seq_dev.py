"""seq2seq dev ROUGE during fine-tuning (``train.best_metric=dev_rougeL``) on two ZeRO-3
ranks, equal to generating with the exported (unpartitioned) model in this process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from scilm_hpc.schema import EvalConfig

from .test_finetune import finetune
from .test_seq2seq import (  # noqa: F401  (fixtures)
    prepare_corpus,
    tiny_bert_encoder_dir,
    tiny_llama_dir,
)


@pytest.fixture(scope="module")
def early_eos_llama_dir(tmp_path_factory, tiny_llama_dir):  # noqa: F811
    """The tiny Llama with EOS scoring just above "the": a sequence ends where it would
    have said "the", so generations end at different lengths on different prompts."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("early-eos-llama")
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    with torch.no_grad():
        the = tokenizer.convert_tokens_to_ids("the")
        model.lm_head.weight[tokenizer.sep_token_id] = 1.01 * model.lm_head.weight[the]
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


ZERO3_NO_REUSE = (
    "stage3_param_persistence_threshold",
    "stage3_max_live_parameters",
    "stage3_max_reuse_distance",
    "stage3_prefetch_bucket_size",
)
ROUGE = ("dev_rouge1", "dev_rouge2", "dev_rougeL", "dev_rougeLsum", "dev_gen_length")


def exported_dev_rouge(run_dir: Path, shards: Path, limit: int, options: EvalConfig) -> dict:
    """ROUGE of ``run_dir/export`` on the first ``limit`` dev examples, one process."""
    from scilm_hpc.data.dataset import ShardDataset
    from scilm_hpc.evaluate.generation import generation_metrics
    from scilm_hpc.models import load_for_eval, pad_token_id
    from scilm_hpc.tasks import get_task

    dev = ShardDataset(shards, "dev")
    task = get_task("seq2seq")
    tokenizer, model = load_for_eval(str(run_dir / "export"), task, dev)
    metrics = generation_metrics(
        model, tokenizer, dev, task, pad_token_id(tokenizer), options, limit
    )
    assert metrics is not None
    return {f"dev_{k}": v for k, v in metrics.items()}


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_dev_rouge_at_zero3_selects_the_best_checkpoint(tmp_path, early_eos_llama_dir):
    """Dev ROUGE on the first 5 dev examples at steps 2 and 4; the best checkpoint is the
    step with the higher dev_rougeL, and the last figures equal those of the export
    generating alone. On two ranks at ZeRO-3 the ranks hold different numbers of batches
    (3 batches of 2) and generations end at different lengths: without synced_gpus the
    ranks' collectives fall out of step (gloo aborts on the mismatch, checked once)."""
    shards = prepare_corpus(tmp_path / "data", early_eos_llama_dir)
    # every parameter partitioned and gathered again at every forward pass (a tiny model
    # would otherwise stay gathered after the first pass, and no rank would wait on another)
    eager = tmp_path / "zero3.json"
    eager.write_text(json.dumps({"zero_optimization": dict.fromkeys(ZERO3_NO_REUSE, 0)}))
    run = tmp_path / "run"
    done = finetune(
        run,
        shards,
        early_eos_llama_dir,
        "task=seq2seq",
        "zero.stage=3",
        f"zero.config_file={eager}",
        "train.micro_batch_size=2",
        "train.max_steps=4",
        "train.eval_every=2",
        "train.lr=3e-3",
        "train.precision=fp32",
        "train.best_metric=dev_rougeL",
        "train.dev_generate_examples=5",
        "eval.batch_size=2",
        "eval.max_new_tokens=6",
        ranks=2,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    dev = [r for r in rows if "dev_loss" in r]
    assert [r["step"] for r in dev] == [2, 4]
    assert all(r["dev_generated_examples"] == 5 for r in dev)  # the cap, not all 6
    state = json.loads((run / "checkpoints" / "step_4" / "scilm_state.json").read_text())
    best = max(dev, key=lambda r: (r["dev_rougeL"], -r["step"]))  # first of equals wins
    assert state["best"] == {"tag": f"step_{best['step']}", "value": best["dev_rougeL"]}
    options = EvalConfig(batch_size=2, max_new_tokens=6)
    alone = exported_dev_rouge(run, shards, 5, options)
    assert {k: dev[-1][k] for k in ROUGE} == pytest.approx({k: alone[k] for k in ROUGE})
    assert any(r["dev_rouge1"] > 0 for r in dev)


def test_rouge_best_metric_is_accepted_and_the_cap_checked():
    from scilm_hpc.config import load_config, resolve, validate

    base = ["job=finetune", "run.dir=/tmp/x", "task=seq2seq", "train.eval_every=5"]

    def problems(*extra: str) -> str:
        return "\n".join(validate(resolve(load_config(None, [*base, *extra]))))

    assert problems("train.best_metric=dev_rougeL") == ""
    assert problems("train.best_metric=dev_rouge2", "train.dev_generate_examples=0") == ""
    assert "train.dev_generate_examples: got -1" in problems("train.dev_generate_examples=-1")
    assert "allowed for seq2seq: dev_loss" in problems("train.best_metric=dev_bleu")


def test_dev_generate_logs_rouge_without_selecting_by_it():
    """``train.dev_generate``: true generates at dev evaluations whatever best_metric is;
    unset (auto) only for a ROUGE best_metric; false never. Misuse is a config error."""
    from scilm_hpc.config import load_config, resolve, validate
    from scilm_hpc.train.evaluation import dev_generation

    base = ["job=finetune", "run.dir=/tmp/x", "task=seq2seq", "train.eval_every=5"]

    def job(*extra: str):
        return resolve(load_config(None, [*base, *extra]))

    def problems(*extra: str) -> str:
        return "\n".join(validate(job(*extra)))

    for extra, expected in (
        ((), None),
        (("train.best_metric=dev_loss",), None),
        (("train.best_metric=dev_rougeL",), 64),
        (("train.dev_generate=true", "train.best_metric=dev_loss"), 64),
        (("train.dev_generate=true", "train.dev_generate_examples=8"), 8),
        (("train.dev_generate=false",), None),
    ):
        assert problems(*extra) == "", extra
        assert dev_generation(job(*extra)) == expected, extra
    assert "train.dev_generate: false, but train.best_metric=dev_rouge1" in problems(
        "train.dev_generate=false", "train.best_metric=dev_rouge1"
    )
    assert "set train.eval_every > 0" in problems("train.dev_generate=true", "train.eval_every=0")
    assert "train.dev_generate: dev generation is for task seq2seq" in problems(
        "task=classification", "train.dev_generate=true"
    )
