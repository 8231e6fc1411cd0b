"""Model loading, in one place for training, evaluation and compression.

``build_model`` makes the model a run trains (pretrained weights, a head shaped by
the shards' label map); ``load_model`` loads a finished model for a task: a dense
export, a HF directory, ``minilm``, or a directory written by the compress job;
``load_for_eval`` adds the tokenizer and refuses a model that does not fit the
shards; ``pad_token_id`` is the one padding rule every batch uses.
"""

from __future__ import annotations

import warnings
from typing import Any

from scilm_hpc.compress.saving import is_compressed_dir, load_compressed
from scilm_hpc.data.dataset import ShardDataset
from scilm_hpc.errors import UserError, first_line
from scilm_hpc.model_source import load_tokenizer, resolve_model_path
from scilm_hpc.tasks import Task, get_task


def pad_token_id(tokenizer: Any) -> int:
    """The id batches are padded with: the tokenizer's pad token, else its EOS, else 0."""
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    return int(tokenizer.eos_token_id or 0)


def build_model(
    task: str | Task,
    name_or_path: str,
    labels: list[str],
    revision: str | None = None,
    state_dict: dict | None = None,
    decoder_name_or_path: str | None = None,
) -> Any:
    """A pretrained model with a head for ``task`` (new heads initialised by the caller's seed).

    Args:
        task: the task (name or object; a task that learned from the shards, such as
            regression, must come bound to their manifest: ``get_task(name, manifest)``).
        name_or_path: as in ``model.name_or_path``.
        labels: the label map of the shards (index = class id); empty for causal LM.
        revision: hub revision.
        state_dict: weights to load instead of the pretrained ones (resume on another
            world size).
        decoder_name_or_path: as in ``model.decoder_name_or_path`` (seq2seq warm start).

    Raises:
        UserError: if the model cannot be loaded.
    """
    task = get_task(task)
    source = resolve_model_path(name_or_path)
    decoder = resolve_model_path(decoder_name_or_path) if decoder_name_or_path else None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = task.load_pretrained(source, revision, labels, decoder)
    except (OSError, ValueError) as exc:
        raise UserError(
            f"model.name_or_path: cannot load '{name_or_path}' for task '{task.name}' "
            f"({first_line(exc)})"
        ) from None
    for key, value in task.config_attributes().items():
        setattr(model.config, key, value)
    if state_dict is not None:
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
        if unexpected or [k for k in missing if "position_ids" not in k]:
            raise UserError(
                f"checkpoint weights do not fit the model: missing {missing[:3]}, "
                f"unexpected {unexpected[:3]}"
            )
    return model


def load_model(name: str, task: str | Task) -> Any:
    """A finished model for ``task``: a compress job's directory or any HF directory.

    Raises:
        UserError: if it cannot be loaded.
    """
    task = get_task(task)
    source = resolve_model_path(name)
    try:
        if is_compressed_dir(source):
            return load_compressed(source)
        return task.load_finished(source)
    except (OSError, ValueError) as exc:
        raise UserError(
            f"model.name_or_path: cannot load '{name}' for {task.name} ({exc})"
        ) from None


def load_for_eval(name: str, task: str | Task, dataset: ShardDataset) -> tuple[Any, Any]:
    """Tokenizer and model of ``name``, checked against the shards before any inference.

    ``name`` may be a dense export or a directory written by the compress job.

    Raises:
        UserError: if the tokenizer differs from the shards' or the label maps disagree.
    """
    task = get_task(task)
    tokenizer = load_tokenizer(name)
    dataset.check_tokenizer(tokenizer, name)
    model = load_model(name, task)
    if task.has_label_map:
        model_labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
        if model_labels != dataset.label_names:
            raise UserError(
                f"model.name_or_path: '{name}' predicts labels {model_labels}, the "
                f"shards' label map is {dataset.label_names}; evaluate a model "
                f"fine-tuned on these shards"
            )
    return tokenizer, model.eval()
