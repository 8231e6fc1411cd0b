"""Tasks: one module per model head, behind the ``Task`` protocol of ``tasks.base``.

``get_task(name)`` returns the task object the jobs ask. Adding a task means adding
one module with a ``Task`` subclass, registering it in ``TASKS`` below and naming it
in ``schema.TASKS`` (the checklist is in CONTRIBUTING.md).
"""

from __future__ import annotations

from typing import Any

from scilm_hpc.errors import UserError
from scilm_hpc.tasks.base import ExampleResult, Task
from scilm_hpc.tasks.causal_lm import CausalLM
from scilm_hpc.tasks.classification import Classification
from scilm_hpc.tasks.regression import Regression
from scilm_hpc.tasks.seq2seq import Seq2Seq
from scilm_hpc.tasks.token_classification import TokenClassification

TASKS: dict[str, Task] = {
    task.name: task
    for task in (Classification(), TokenClassification(), CausalLM(), Regression(), Seq2Seq())
}


def get_task(task: str | Task, manifest: dict[str, Any] | None = None) -> Task:
    """The task object of ``task`` (a name from ``schema.TASKS``, or a task already),
    bound to the ``task_state`` of a shard ``manifest`` when one is given.

    Raises:
        UserError: for a name no module registers.
    """
    if not isinstance(task, Task):
        if task not in TASKS:
            raise UserError(f"task: got '{task}'; allowed: {', '.join(TASKS)}")
        task = TASKS[task]
    if manifest is not None:
        task = task.bind(manifest.get("task_state") or {})
    return task


__all__ = ["ExampleResult", "Task", "TASKS", "get_task"]
