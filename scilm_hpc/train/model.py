"""Build the model for a task from ``model.name_or_path`` with the shards' label map."""

from __future__ import annotations

import warnings
from typing import Any

from scilm_hpc.errors import UserError
from scilm_hpc.model_source import resolve_model_path

AUTO_CLASSES = {
    "classification": "AutoModelForSequenceClassification",
    "token_classification": "AutoModelForTokenClassification",
    "causal_lm": "AutoModelForCausalLM",
}


def auto_class(task: str) -> Any:
    """The transformers ``AutoModelFor*`` class of a task."""
    import transformers

    return getattr(transformers, AUTO_CLASSES[task])


def build_model(
    task: str,
    name_or_path: str,
    labels: list[str],
    revision: str | None = None,
    state_dict: dict | None = None,
) -> Any:
    """A pretrained model with a head for ``task`` (new heads initialised by the caller's seed).

    Args:
        task: classification, token_classification or causal_lm.
        name_or_path: as in ``model.name_or_path``.
        labels: the label map of the shards (index = class id); empty for causal LM.
        revision: hub revision.
        state_dict: weights to load instead of the pretrained ones (resume on another
            world size).

    Raises:
        UserError: if the model cannot be loaded.
    """
    source = resolve_model_path(name_or_path)
    kwargs: dict[str, Any] = {"revision": revision}
    if task != "causal_lm":
        kwargs.update(
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={name: i for i, name in enumerate(labels)},
            ignore_mismatched_sizes=True,
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = auto_class(task).from_pretrained(source, **kwargs)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"model.name_or_path: cannot load '{name_or_path}' for task '{task}' ({first})"
        ) from None
    if state_dict is not None:
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
        if unexpected or [k for k in missing if "position_ids" not in k]:
            raise UserError(
                f"checkpoint weights do not fit the model: missing {missing[:3]}, "
                f"unexpected {unexpected[:3]}"
            )
    return model
