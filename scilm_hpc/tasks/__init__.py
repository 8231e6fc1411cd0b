"""Tasks: one module per model head, behind the ``Task`` protocol of ``tasks.base``.

``get_task(name)`` returns the task object the jobs ask. Adding a task means adding
one module with a ``Task`` subclass, registering it in ``TASKS`` below and naming it
in ``schema.TASKS`` (the checklist is in CONTRIBUTING.md).
"""

from __future__ import annotations

from scilm_hpc.errors import UserError
from scilm_hpc.tasks.base import ExampleResult, Task
from scilm_hpc.tasks.causal_lm import CausalLM
from scilm_hpc.tasks.classification import Classification
from scilm_hpc.tasks.seq2seq import Seq2Seq
from scilm_hpc.tasks.token_classification import TokenClassification

TASKS: dict[str, Task] = {
    task.name: task for task in (Classification(), TokenClassification(), CausalLM(), Seq2Seq())
}


def get_task(task: str | Task) -> Task:
    """The task object of ``task`` (a name from ``schema.TASKS``, or a task already).

    Raises:
        UserError: for a name no module registers.
    """
    if isinstance(task, Task):
        return task
    if task not in TASKS:
        raise UserError(f"task: got '{task}'; allowed: {', '.join(TASKS)}")
    return TASKS[task]


__all__ = ["ExampleResult", "Task", "TASKS", "get_task"]
