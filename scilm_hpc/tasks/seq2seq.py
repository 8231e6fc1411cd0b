"""``seq2seq``: source -> target generation (abstract -> title or TLDR).

Two model kinds, told apart by the model's config (``model_kind``):

- **encoder-decoder** (any ``AutoModelForSeq2SeqLM``, or two encoders warm-started as
  an ``EncoderDecoderModel`` with ``model.decoder_name_or_path``): a shard example's
  ``input_ids`` are the source tokens followed by the target tokens, and the
  per-example column ``source_length`` says where the target starts. The batch's
  encoder input is the source, its ``labels`` the target (the model shifts them right
  behind its decoder start token).
- **decoder-only** (``AutoModelForCausalLM``): ``input_ids`` are the prompt
  (``data.prompt_template`` with the source in place of ``{source}``) followed by the
  target and EOS; ``token_labels`` holds the target ids and -100 on every prompt token,
  so the loss covers the target only. A long source is cut before the template is
  applied, so neither the template nor the target is ever cut by ``data.max_length``.

A target longer than ``data.max_target_length`` tokens (EOS included) is cut, and
counted (``take_stats``; prepare writes the counts into the manifest and the log).
Every shard example also keeps its source text, its references (a JSON list; the
target alone unless ``data.references_field`` names a list) and its record
(``file:line``) for ``predictions.jsonl``. Metrics: the target tokens' loss and
perplexity (dev evaluation during fine-tuning); with generated text (the evaluate
job) also ROUGE-1/2/L/Lsum F1 (x100, ``rouge-score`` with stemming, the best
reference of each example) and the mean generated length in tokens.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from scilm_hpc.data.encode import IGNORE_INDEX
from scilm_hpc.data.readers import Example, TargetFields
from scilm_hpc.errors import UserError
from scilm_hpc.model_source import load_tokenizer, path_problem, resolve_model_path
from scilm_hpc.schema import DataConfig, JobConfig, check_at_least
from scilm_hpc.tasks.base import ExampleResult, Task, pad_inputs
from scilm_hpc.tasks.causal_lm import lm_metrics, token_loss_results

ENCODER_DECODER = "encoder-decoder"
DECODER_ONLY = "decoder-only"
PLACEHOLDER = "{source}"
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
#: the ``train.best_metric`` values that make dev evaluation generate
DEV_ROUGE = tuple(f"dev_{key}" for key in ROUGE_TYPES)


def model_kind(name_or_path: str, decoder: str | None = None, revision: str | None = None) -> str:
    """``encoder-decoder`` or ``decoder-only``, from the model's config.

    Raises:
        UserError: for a model that cannot generate (an encoder alone, a classifier).
    """
    if decoder is not None:
        return ENCODER_DECODER
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    try:
        config = AutoConfig.from_pretrained(resolve_model_path(name_or_path), revision=revision)
    except (OSError, ValueError) as exc:
        raise UserError(
            f"model.name_or_path: cannot read the config of '{name_or_path}' ({exc})"
        ) from None
    if config.is_encoder_decoder:
        return ENCODER_DECODER
    architectures = config.architectures or []
    if (
        getattr(config, "is_decoder", False)
        or any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)
        or (
            config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
            and config.model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES
        )
    ):
        return DECODER_ONLY
    raise UserError(
        f"model.name_or_path: '{name_or_path}' ({', '.join(architectures) or config.model_type}) "
        f"cannot generate text; for task seq2seq give an encoder-decoder "
        f"(AutoModelForSeq2SeqLM), a decoder-only model (AutoModelForCausalLM), or an "
        f"encoder with model.decoder_name_or_path to warm-start an encoder-decoder"
    )


def eos_token_id(tokenizer: Any) -> int:
    """The token that ends a target: the tokenizer's EOS, else its SEP ([SEP] of BERT).

    Raises:
        UserError: if the tokenizer has neither.
    """
    for token_id in (tokenizer.eos_token_id, tokenizer.sep_token_id):
        if token_id is not None:
            return int(token_id)
    raise UserError(
        "model.name_or_path: the tokenizer has no EOS (or SEP) token to end a target with"
    )


def decoder_start_token_id(tokenizer: Any) -> int:
    """The first decoder token of a warm-started encoder-decoder: BOS, else CLS."""
    for token_id in (tokenizer.bos_token_id, tokenizer.cls_token_id, tokenizer.pad_token_id):
        if token_id is not None:
            return int(token_id)
    raise UserError("model.name_or_path: the tokenizer has no BOS, CLS or PAD token")


def template_problem(template: str) -> str | None:
    """Why ``data.prompt_template`` cannot be used, or None."""
    count = template.count(PLACEHOLDER)
    if count != 1:
        return (
            f"data.prompt_template: must hold the placeholder {PLACEHOLDER} exactly once "
            f"(the source goes there, the target follows the template), got {count} in "
            f"{template!r}"
        )
    return None


def _cut(ids: list[int], limit: int, keep_last: bool) -> list[int]:
    """``ids`` cut to ``limit`` tokens, keeping the final (special) token if asked."""
    if len(ids) <= limit:
        return ids
    return [*ids[: limit - 1], ids[-1]] if keep_last and limit > 0 else ids[:limit]


def rouge_scores(generated: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Mean ROUGE-1/2/L/Lsum F1 x 100 (``rouge-score``, stemming; per example the best
    reference for each ROUGE type)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for text, refs in zip(generated, references, strict=True):
        scores = scorer.score_multi(list(refs), text)
        for key in ROUGE_TYPES:
            totals[key] += scores[key].fmeasure
    n = max(len(generated), 1)
    return {key: 100.0 * value / n for key, value in totals.items()}


class Seq2Seq(Task):
    """Source -> target generation with an encoder-decoder or a decoder-only model."""

    name = "seq2seq"
    auto_class_name = "AutoModelForSeq2SeqLM"
    static_int8 = False
    formats = ("jsonl", "csv", "parquet")
    has_label_map = False
    headline = ("rouge1", "rouge2", "rougeL", "rougeLsum", "gen_length", "loss")
    main_metric = ("rougeL", True)
    generates = True
    generated_dev_metrics = DEV_ROUGE

    def __init__(self, data: DataConfig | None = None, kind: str = ENCODER_DECODER) -> None:
        self.data = data or DataConfig()
        self.kind = kind
        self._stats = {"truncated_targets": 0, "truncated_sources": 0}

    def for_job(self, job: JobConfig) -> Seq2Seq:
        kind = model_kind(
            job.model.name_or_path, job.model.decoder_name_or_path, job.model.revision
        )
        return Seq2Seq(job.data, kind)

    # --- models --------------------------------------------------------------------
    def load_pretrained(
        self, source: str, revision: str | None, labels: list[str], decoder: str | None = None
    ) -> Any:
        import transformers

        tokenizer = load_tokenizer(source, revision)
        eos, pad = eos_token_id(tokenizer), tokenizer.pad_token_id
        if decoder is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = transformers.EncoderDecoderModel.from_encoder_decoder_pretrained(
                    source, decoder
                )
            if model.config.decoder.vocab_size != len(tokenizer):
                raise UserError(
                    f"model.decoder_name_or_path: the decoder's vocabulary "
                    f"({model.config.decoder.vocab_size}) is not the tokenizer's of "
                    f"model.name_or_path ({len(tokenizer)}); warm-start from two "
                    f"checkpoints that share a tokenizer"
                )
            model.config.decoder_start_token_id = decoder_start_token_id(tokenizer)
            model.config.pad_token_id = pad if pad is not None else eos
            model.config.eos_token_id = eos
            model.config.vocab_size = model.config.decoder.vocab_size
            model.generation_config = transformers.GenerationConfig(
                decoder_start_token_id=model.config.decoder_start_token_id,
                bos_token_id=model.config.decoder_start_token_id,
                pad_token_id=model.config.pad_token_id,
                eos_token_id=eos,
                max_length=self.data.max_target_length + 1,
            )
            return model
        auto = (
            transformers.AutoModelForSeq2SeqLM
            if self.kind == ENCODER_DECODER
            else transformers.AutoModelForCausalLM
        )
        model = auto.from_pretrained(source, revision=revision)
        model.generation_config.eos_token_id = eos
        model.generation_config.pad_token_id = pad if pad is not None else eos
        if self.kind == DECODER_ONLY:
            model.generation_config.max_new_tokens = self.data.max_target_length
        return model

    def class_for_config(self, config: Any) -> Any:
        import transformers

        if config.is_encoder_decoder:
            return transformers.AutoModelForSeq2SeqLM
        return transformers.AutoModelForCausalLM

    def load_finished(self, source: str) -> Any:
        import transformers

        kind = model_kind(source)
        auto = (
            transformers.AutoModelForSeq2SeqLM
            if kind == ENCODER_DECODER
            else transformers.AutoModelForCausalLM
        )
        return auto.from_pretrained(source)

    # --- prepare -------------------------------------------------------------------
    def config_problems(self, job: JobConfig) -> list[str]:
        """Checks of the seq2seq keys: target limit, prompt template, generation."""
        p: list[str] = []
        d = job.data
        check_at_least(p, "data.max_target_length", d.max_target_length, 2)
        if d.max_target_length >= d.max_length:
            p.append(
                f"data.max_target_length: {d.max_target_length} leaves no room for the source "
                f"in data.max_length={d.max_length}; make it smaller"
            )
        problem = template_problem(d.prompt_template)
        if problem:
            p.append(problem)
        if job.model.decoder_name_or_path is not None:
            decoder_problem = path_problem(job.model.decoder_name_or_path)
            if decoder_problem:
                p.append(
                    decoder_problem.replace("model.name_or_path", "model.decoder_name_or_path")
                )
        for key in ("max_new_tokens", "num_beams"):
            check_at_least(p, f"eval.{key}", getattr(job.eval, key), 1)
        if job.eval.length_penalty != 1.0 and job.eval.num_beams == 1:
            p.append("eval.length_penalty: applies to beam search only; set eval.num_beams > 1")
        allowed = ("dev_loss", "dev_perplexity", *DEV_ROUGE)
        if job.train.best_metric not in (None, *allowed):
            p.append(
                f"train.best_metric: got {job.train.best_metric!r}; allowed for seq2seq: "
                f"{', '.join(allowed)} (ROUGE generates on train.dev_generate_examples dev "
                f"examples at each dev evaluation)"
            )
        check_at_least(p, "train.dev_generate_examples", job.train.dev_generate_examples, 0)
        if job.train.dev_generate and not job.train.eval_every:
            p.append("train.dev_generate: generates at dev evaluations; set train.eval_every > 0")
        if job.train.dev_generate is False and job.train.best_metric in DEV_ROUGE:
            p.append(
                f"train.dev_generate: false, but train.best_metric={job.train.best_metric} "
                f"needs dev generation; remove one of them"
            )
        return p

    def target_fields(self, data: DataConfig) -> TargetFields | None:
        return TargetFields(data.target_field, data.references_field)

    def take_stats(self) -> dict[str, int]:
        stats, self._stats = self._stats, dict.fromkeys(self._stats, 0)
        return stats

    def manifest_options(self) -> dict[str, Any]:
        d = self.data
        return {
            "model_kind": self.kind,
            "target_field": d.target_field,
            "references_field": d.references_field,
            "max_target_length": d.max_target_length,
            "prompt_template": d.prompt_template if self.kind == DECODER_ONLY else None,
        }

    def encode(
        self,
        tokenizer: Any,
        examples: Sequence[Example],
        label_ids: dict[str, int],
        max_length: int,
    ) -> tuple[list[np.ndarray], dict[str, Any]]:
        if self.kind == DECODER_ONLY:
            ids, columns = self._encode_decoder_only(tokenizer, examples, max_length)
        else:
            ids, columns = self._encode_encoder_decoder(tokenizer, examples, max_length)
        columns["source_text"] = [ex.text or "" for ex in examples]
        columns["references"] = [json.dumps(list(ex.references or ())) for ex in examples]
        columns["record"] = [ex.source for ex in examples]
        return ids, columns

    def _tokens(self, tokenizer: Any, texts: list[str], special: bool) -> list[list[int]]:
        return tokenizer(
            texts,
            add_special_tokens=special,
            return_attention_mask=False,
            return_token_type_ids=False,
        )["input_ids"]

    def _encode_encoder_decoder(
        self, tokenizer: Any, examples: Sequence[Example], max_length: int
    ) -> tuple[list[np.ndarray], dict[str, Any]]:
        specials = set(tokenizer.all_special_ids)
        sources = self._tokens(tokenizer, [ex.text or "" for ex in examples], True)
        targets = self._tokens(tokenizer, [ex.target or "" for ex in examples], True)
        # BERT-likes start every sequence with [CLS], which is the decoder start token:
        # the labels begin after it (BART keeps its <s>, as its own recipes do)
        drop_first = tokenizer.bos_token_id is None and tokenizer.cls_token_id is not None
        ids, lengths = [], []
        for source, target in zip(sources, targets, strict=True):
            if drop_first and target and target[0] == tokenizer.cls_token_id:
                target = target[1:]
            self._stats["truncated_sources"] += len(source) > max_length
            self._stats["truncated_targets"] += len(target) > self.data.max_target_length
            source = _cut(source, max_length, bool(source) and source[-1] in specials)
            target = _cut(
                target, self.data.max_target_length, bool(target) and target[-1] in specials
            )
            ids.append(np.asarray(source + target, dtype=np.int32))
            lengths.append(len(source))
        return ids, {"source_length": lengths}

    def _encode_decoder_only(
        self, tokenizer: Any, examples: Sequence[Example], max_length: int
    ) -> tuple[list[np.ndarray], dict[str, Any]]:
        template = self.data.prompt_template
        problem = template_problem(template)
        if problem:
            raise UserError(problem)
        prefix, _, suffix = template.partition(PLACEHOLDER)
        head = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        head += self._tokens(tokenizer, [prefix], False)[0] if prefix else []
        tail = self._tokens(tokenizer, [suffix], False)[0] if suffix else []
        eos = eos_token_id(tokenizer)
        # the target continues the prompt's text: a space between them unless the
        # template ends in whitespace (byte-level BPE marks a word's leading space)
        sep = "" if not template or template[-1].isspace() else " "
        sources = self._tokens(tokenizer, [ex.text or "" for ex in examples], False)
        targets = self._tokens(tokenizer, [sep + (ex.target or "") for ex in examples], False)
        ids, labels, lengths = [], [], []
        for source, target in zip(sources, targets, strict=True):
            limit = self.data.max_target_length - 1  # EOS counts
            self._stats["truncated_targets"] += len(target) > limit
            target = [*target[:limit], eos]
            budget = max(max_length - len(head) - len(tail) - len(target), 0)
            self._stats["truncated_sources"] += len(source) > budget
            prompt = head + source[:budget] + tail
            ids.append(np.asarray(prompt + target, dtype=np.int32))
            labels.append(np.asarray([IGNORE_INDEX] * len(prompt) + target, dtype=np.int32))
            lengths.append(len(prompt))
        return ids, {"token_labels": labels, "source_length": lengths}

    # --- training ------------------------------------------------------------------
    def collate(self, items: Sequence[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
        if "labels" in items[0]:  # decoder-only: prompt + target, prompt masked
            batch = pad_inputs(items, pad_id)
            labels = torch.full(batch["input_ids"].shape, IGNORE_INDEX, dtype=torch.long)
            for i, it in enumerate(items):
                labels[i, : len(it["labels"])] = torch.from_numpy(it["labels"].astype(np.int64))
            batch["labels"] = labels
            return batch
        sources = [{"input_ids": it["input_ids"][: it["source_length"]]} for it in items]
        targets = [it["input_ids"][it["source_length"] :] for it in items]
        batch = pad_inputs(sources, pad_id)
        labels = torch.full(
            (len(items), max(len(t) for t in targets)), IGNORE_INDEX, dtype=torch.long
        )
        for i, target in enumerate(targets):
            labels[i, : len(target)] = torch.from_numpy(target.astype(np.int64))
        batch["labels"] = labels
        # also marks the batch as encoder-decoder for ``example_results``
        batch["decoder_attention_mask"] = (labels != IGNORE_INDEX).long()
        return batch

    def distill_positions(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """The logits that predict target tokens (compression recovery distils on them)."""
        labels = batch["labels"]
        if "decoder_attention_mask" in batch:  # the decoder's logits line up with labels
            return labels != IGNORE_INDEX
        keep = torch.zeros_like(labels, dtype=torch.bool)
        keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX  # position t predicts token t + 1
        return keep

    def forward_inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        inputs = super().forward_inputs(batch)
        if "decoder_attention_mask" in batch:  # the decoder reads the shifted target
            inputs["labels"] = batch["labels"]
            inputs["decoder_attention_mask"] = batch["decoder_attention_mask"]
        return inputs

    def generation_inputs(self, items: Sequence[dict[str, Any]], pad_id: int) -> dict[str, Any]:
        """The prompts (decoder-only, padded on the left) or sources (encoder-decoder)."""
        prompts = [it["input_ids"][: it["source_length"]] for it in items]
        width = max(len(p) for p in prompts)
        ids = torch.full((len(items), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        left = "labels" in items[0]
        for i, prompt in enumerate(prompts):
            span = slice(width - len(prompt), width) if left else slice(0, len(prompt))
            ids[i, span] = torch.from_numpy(prompt.astype(np.int64))
            mask[i, span] = 1
        return {"input_ids": ids, "attention_mask": mask}

    # --- evaluation ----------------------------------------------------------------
    def example_results(
        self, logits: torch.Tensor, batch: dict[str, torch.Tensor]
    ) -> list[ExampleResult]:
        labels = batch["labels"]
        if "decoder_attention_mask" not in batch:  # decoder-only: position t predicts t + 1
            logits, labels = logits[:, :-1], labels[:, 1:]
        return token_loss_results(logits, labels)

    def metrics(self, results: Sequence[ExampleResult], labels: Sequence[str]) -> dict[str, Any]:
        counted = sum(r[1] for r in results)  # 0: evaluated without eval.target_loss
        out: dict[str, Any] = lm_metrics(sum(r[0] for r in results), counted) if counted else {}
        if results and results[0][2] is not None:
            generated = [r[2]["generated"] for r in results]
            out.update(rouge_scores(generated, [r[3] for r in results]))
            out["gen_length"] = float(np.mean([r[2]["gen_tokens"] for r in results]))
        return out

    def prediction_record(self, pred: Any, gold: Any) -> dict[str, Any]:
        if pred is None:
            return {"references": gold}
        return {
            "id": pred["id"],
            "source": pred["source"],
            "generated": pred["generated"],
            "references": gold,
        }

    def report_sections(self, evaluations: list[dict[str, Any]], labels: list[str]) -> list[str]:
        lines: list[str] = []
        for ev in evaluations:
            shown = [r for r in ev["predictions"] if r[2] is not None][:3]
            if not shown:
                continue
            lines += ["", f"## Examples: `{ev['model']}`"]
            for loss, count, pred, refs in shown:
                source = " ".join(pred["source"].split())  # one markdown line
                source = source if len(source) <= 400 else source[:400] + " ..."
                scored = f" (target loss {loss / count:.3f})" if count else ""
                lines += [
                    "",
                    f"**{pred['id']}**{scored}",
                    "",
                    f"- source: {source}",
                    f"- generated: {pred['generated']}",
                    *[f"- reference: {r}" for r in refs],
                ]
        return lines
