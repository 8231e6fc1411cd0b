"""The protocol every task module implements, and the pieces tasks share.

A task decides everything that differs between, say, classifying a document and
tagging its words: which fields a corpus record needs, how a record is encoded and
what a shard stores beside the token ids, how items are collated into a batch,
which ``transformers`` auto class builds the model, which positions the
distillation loss looks at, how per-example results are made from logits and
turned into metrics, and what the evaluation report shows. The jobs, the trainer,
evaluation and compression ask the task object (``scilm_hpc.tasks.get_task``)
instead of branching on its name.

Shard columns follow a naming rule the shard reader applies without knowing the
task (``data.shards``): a column named ``token_*`` holds one value per token,
aligned with ``input_ids``; any other column holds one row per example. The item
key of a column drops the ``token_`` prefix, so ``token_labels`` and ``labels``
both reach ``collate`` as ``labels``.

A task may learn something from the training split at prepare time (``fit``:
regression's label mean and standard deviation); the manifest stores it as
``task_state`` and ``tasks.get_task(name, manifest)`` returns the task bound to it
(``bind``), which is what inference and training use.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from scilm_hpc.data.readers import Example, TargetFields
from scilm_hpc.errors import UserError
from scilm_hpc.schema import DataConfig, JobConfig, TrainConfig

#: An example's evaluation result: (loss sum, counted targets, prediction, gold).
ExampleResult = tuple[float, int, Any, Any]


def pad_inputs(items: Sequence[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """``input_ids`` padded to the longest item (dynamic padding) and the attention mask."""
    width = max(len(it["input_ids"]) for it in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for i, it in enumerate(items):
        n = len(it["input_ids"])
        ids[i, :n] = torch.from_numpy(it["input_ids"].astype(np.int64))
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask}


def class_weight_tensor(weights: dict[str, float], labels: Sequence[str]) -> torch.Tensor | None:
    """``train.class_weights`` as one weight per class id (1.0 where not named); None
    without weights.

    Raises:
        UserError: for a name that is not in the shards' label map.
    """
    if not weights:
        return None
    unknown = sorted(set(weights) - set(labels))
    if unknown:
        raise UserError(
            f"train.class_weights: {', '.join(unknown)} not in the shards' label map "
            f"({', '.join(labels)})"
        )
    return torch.tensor([float(weights.get(name, 1.0)) for name in labels])


def class_weighted_loss(
    outputs: Any, labels: torch.Tensor, weights: dict[str, float], names: Sequence[str]
) -> torch.Tensor:
    """The model's own loss, or with ``train.class_weights`` (``weights``, by class name
    in ``names``) a weighted cross-entropy: a weighted mean over the labelled positions,
    ``IGNORE_INDEX`` skipped. Classification and per-token tags share it."""
    weight = class_weight_tensor(weights, names)
    if weight is None:
        return outputs.loss
    logits = outputs.logits
    return torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]),
        labels.reshape(-1),
        weight=weight.to(logits.device),
        ignore_index=-100,
    )


class Task(ABC):
    """One task: a model head, its data, its loss and its metrics (see module docstring)."""

    #: the value of the ``task`` key
    name: ClassVar[str]
    #: the ``transformers`` auto class that builds the model with this task's head
    auto_class_name: ClassVar[str]
    #: corpus formats (``data.format``) that can feed this task
    formats: ClassVar[tuple[str, ...]]
    #: whether the shards carry a label map (class or tag names)
    has_label_map: ClassVar[bool] = True
    #: what a record's label field holds (``data.readers.LABEL_KINDS``)
    label_kind: ClassVar[str] = "name"
    #: the model outputs values, not class scores: distillation matches them by MSE
    #: (a KL of softmaxes over one output is always zero)
    outputs_values: ClassVar[bool] = False
    #: metrics shown in the report's table, in order
    headline: ClassVar[tuple[str, ...]]
    #: the metric a trade-off is judged by, and whether higher is better
    main_metric: ClassVar[tuple[str, bool]]
    #: whether evaluation generates text (``evaluate.generation``) besides scoring
    generates: ClassVar[bool] = False
    #: dev metrics that need generated text: ``train.best_metric`` naming one makes the
    #: finetune job's dev evaluation generate
    generated_dev_metrics: ClassVar[tuple[str, ...]] = ()
    #: ``train.loss`` values this task trains with (``auto``: the model's own loss)
    losses: ClassVar[tuple[str, ...]] = ("auto",)
    #: whether ``train.class_weights`` applies (the loss is a cross-entropy over classes)
    class_weighted: ClassVar[bool] = False
    #: whether static int8 (``quantize.method: static``) applies: an encoder scored by
    #: its logits, whose activations suit per-tensor ranges fixed in advance
    static_int8: ClassVar[bool] = True

    def for_job(self, job: JobConfig) -> Task:
        """This task set up with a job's options (tasks without options: itself)."""
        return self

    def auto_class(self) -> Any:
        """The ``transformers`` ``AutoModelFor*`` class of this task."""
        import transformers

        return getattr(transformers, self.auto_class_name)

    def class_for_config(self, config: Any) -> Any:
        """The ``transformers`` class that builds a model of this task from ``config``
        (the auto class; a task with several model kinds picks by the config)."""
        return self.auto_class()

    def model_kwargs(self, labels: list[str]) -> dict[str, Any]:
        """Keyword arguments of ``from_pretrained`` that shape the head for ``labels``."""
        if not self.has_label_map:
            return {}
        return {
            "num_labels": len(labels),
            "id2label": dict(enumerate(labels)),
            "label2id": {name: i for i, name in enumerate(labels)},
            "ignore_mismatched_sizes": True,
        }

    def config_attributes(self) -> dict[str, Any]:
        """Attributes ``models.build_model`` sets on the model's config (saved with every
        export, so a plain ``from_pretrained`` user has them)."""
        return {}

    def config_problems(self, job: JobConfig) -> list[str]:
        """Checks of this task's own config keys, one line per problem (``config.validate``
        adds them to its own)."""
        return []

    def load_pretrained(
        self, source: str, revision: str | None, labels: list[str], decoder: str | None = None
    ) -> Any:
        """A pretrained model to train (``decoder``: a second checkpoint, where the task
        builds one model from two)."""
        return self.auto_class().from_pretrained(
            source, revision=revision, **self.model_kwargs(labels)
        )

    def load_finished(self, source: str) -> Any:
        """A finished (exported) model of this task."""
        return self.auto_class().from_pretrained(source)

    # --- prepare -------------------------------------------------------------------
    #: whether the task learns something from the training split (``fit_part``)
    learns_from_train = False

    def fit(self, train: Iterable[Example]) -> dict[str, Any]:
        """What the task learns from the training split (JSON; the manifest's
        ``task_state``), read once as a stream: ``fit_merge`` of one ``fit_part``."""
        return self.fit_merge([self.fit_part(train)])

    def fit_part(self, train: Iterable[Example]) -> Any:
        """What one prepare rank keeps of its stretch of the training split for
        ``fit_merge`` (picklable). Nothing by default (``train`` unread)."""
        return None

    def fit_merge(self, parts: list[Any]) -> dict[str, Any]:
        """The ``task_state`` from every rank's ``fit_part``, in corpus order."""
        return {}

    def bind(self, state: dict[str, Any]) -> Task:
        """This task bound to a ``fit`` result (itself when it learns nothing)."""
        return self

    def target_fields(self, data: DataConfig) -> TargetFields | None:
        """The target (and references) fields a record needs, or None (no target)."""
        return None

    def take_stats(self) -> dict[str, int]:
        """Counts ``encode`` kept since the last call (e.g. truncated targets), then reset."""
        return {}

    def manifest_options(self) -> dict[str, Any]:
        """This task's options the manifest records (how the shards were encoded)."""
        return {}

    def label_field(self, configured: str) -> str | None:
        """The record field read as the label (``data.label_field``), or None."""
        return None

    def example_labels(self, example: Example) -> tuple[str, ...]:
        """The label names one example contributes to the label map."""
        return ()

    @abstractmethod
    def encode(
        self,
        tokenizer: Any,
        examples: Sequence[Example],
        label_ids: dict[str, int],
        max_length: int,
    ) -> tuple[list[np.ndarray], dict[str, Any]]:
        """Token ids (int32, one array per example) and the shard columns of a batch.

        Columns are lists with one entry per example: an int or float for a
        per-example column, an array aligned with the tokens for a ``token_*`` one.
        """

    def encode_shard(
        self,
        tokenizer: Any,
        examples: Sequence[Example],
        label_ids: dict[str, int],
        data: DataConfig,
    ) -> tuple[list[np.ndarray], dict[str, list[Any]], dict[str, int]]:
        """Token ids, shard columns and token counts of the examples of one shard.

        By default ``encode`` in batches of ``data.tokenize_batch_size``, no counts; a
        task that packs documents into blocks (``data.packing``) overrides this. The
        counts (e.g. ``tokens_in``, ``tokens_kept``) are summed per split into the
        manifest.
        """
        ids: list[np.ndarray] = []
        columns: dict[str, list[Any]] = {}
        for start in range(0, len(examples), data.tokenize_batch_size):
            batch_ids, batch_columns = self.encode(
                tokenizer,
                examples[start : start + data.tokenize_batch_size],
                label_ids,
                data.max_length,
            )
            ids += batch_ids
            for name, values in batch_columns.items():
                columns.setdefault(name, []).extend(values)
        return ids, columns, {}

    # --- training ------------------------------------------------------------------
    @abstractmethod
    def collate(self, items: Sequence[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
        """A padded batch with ``labels`` in the form the model's own loss expects."""

    def model_inputs(self, batch: dict[str, torch.Tensor], model: Any) -> dict[str, Any]:
        """The keyword arguments of ``model``'s forward for a collated ``batch`` (the batch
        itself by default; a packed batch adds its block-diagonal attention for ``model``,
        which may be a DeepSpeed engine or a peft wrapper)."""
        return dict(batch)

    def forward_inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The part of a collated batch that scoring feeds the model (without the labels:
        logits only, the task computes its own per-example losses)."""
        return {k: v for k, v in batch.items() if k != "labels"}

    def distill_positions(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """Which logits rows the distillation loss compares (None: every example)."""
        return None

    def training_loss(
        self,
        outputs: Any,
        batch: dict[str, torch.Tensor],
        train: TrainConfig,
        labels: Sequence[str],
    ) -> torch.Tensor:
        """The loss training minimises: the model's own (``outputs.loss``), or with
        ``train.class_weights`` a class-weighted cross-entropy (``config.validate`` allows
        the weights for the two classification tasks only); regression overrides it for
        ``train.loss``."""
        if not train.class_weights:
            return outputs.loss
        return class_weighted_loss(outputs, batch["labels"], train.class_weights, labels)

    # --- evaluation ----------------------------------------------------------------
    @abstractmethod
    def example_results(
        self, logits: torch.Tensor, batch: dict[str, torch.Tensor]
    ) -> list[ExampleResult]:
        """Per-example results of one batch's logits."""

    @abstractmethod
    def metrics(self, results: Sequence[ExampleResult], labels: Sequence[str]) -> dict[str, Any]:
        """The task's metrics from per-example results in example order."""

    def prediction_record(self, pred: Any, gold: Any) -> dict[str, Any]:
        """One example's row of ``predictions.jsonl`` (besides model, index and loss)."""
        return {"pred": pred, "gold": gold}

    def report_sections(self, evaluations: list[dict[str, Any]], labels: list[str]) -> list[str]:
        """Markdown lines ``eval.md`` shows after the headline table."""
        return []

    def plots(self, evaluations: list[dict[str, Any]], labels: list[str], run_dir: Path) -> None:
        """Plots of the evaluation under ``run_dir/plots/`` (none by default)."""
        return None
