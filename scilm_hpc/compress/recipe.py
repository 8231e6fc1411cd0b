"""The rules a compression recipe (``configs/compress/NAME.yaml``) must follow.

``config.validate`` runs them for a compress job, so a bad recipe is refused with
every problem at once, before anything is submitted.
"""

from __future__ import annotations

import importlib.util

from scilm_hpc import schema
from scilm_hpc.schema import CompressStep, JobConfig, check_at_least, check_choice


def recipe_problems(job: JobConfig, recipes: list[str]) -> list[str]:
    """Checks of a compress job: the recipe's steps, one task, a CPU-side ZeRO stage.

    Args:
        job: the compress job.
        recipes: the recipe names ``compress=NAME`` may pick (for the message).

    Returns:
        One line per problem, each naming the dotted key and what is allowed.
    """
    p: list[str] = []
    c = job.compress
    check_choice(p, "compress.eval_split", c.eval_split, schema.SPLITS)
    for key in ("latency_batch", "latency_repeats"):
        check_at_least(p, f"compress.{key}", getattr(c, key), 1)
    for key in ("eval_examples", "latency_threads"):
        check_at_least(p, f"compress.{key}", getattr(c, key), 0)
    if not c.steps:
        p.append(
            f"compress.steps: the recipe '{c.name}' has no steps; pick one with compress=NAME "
            f"(available: {', '.join(recipes) or 'none'})"
        )
    if job.cluster.world_size() != 1:
        p.append(
            f"cluster: compress runs as one task, got {job.cluster.world_size()} "
            f"(cluster.nodes x cluster.tasks_per_node); set cluster.tasks_per_node=1"
        )
    quantized = False
    for i, step in enumerate(c.steps):
        key = f"compress.steps.{i}"
        check_choice(p, f"{key}.kind", step.kind, schema.COMPRESS_KINDS)
        if quantized:
            p.append(f"{key}: comes after a quantize step; quantise last")
        if step.kind == "prune":
            check_choice(p, f"{key}.method", step.method, schema.PRUNE_METHODS)
            check_choice(p, f"{key}.pattern", step.pattern, schema.PRUNE_PATTERNS)
            check_choice(p, f"{key}.scope", step.scope, schema.PRUNE_SCOPES)
            check_choice(p, f"{key}.schedule", step.schedule, schema.PRUNE_SCHEDULES)
            check_at_least(p, f"{key}.calibration_batches", step.calibration_batches, 1)
            if step.pattern == "nm":
                if step.n is None or step.m is None or not 0 < step.n < step.m:
                    p.append(
                        f"{key}: N:M pruning keeps n of every m weights and needs "
                        f"0 < n < m, got n={step.n}, m={step.m} (e.g. n: 2, m: 4)"
                    )
            elif step.sparsity is None or not 0.0 <= step.sparsity < 1.0:
                p.append(f"{key}.sparsity: got {step.sparsity}; allowed: 0 <= sparsity < 1")
            if step.method == "wanda" and step.scope == "global" and step.pattern == "unstructured":
                p.append(
                    f"{key}.scope: Wanda compares weights within output rows; use scope: layer"
                )
            if step.schedule == "gradual":
                if step.method != "magnitude" or step.pattern != "unstructured":
                    p.append(
                        f"{key}.schedule: gradual pruning is magnitude, unstructured; got "
                        f"method {step.method}, pattern {step.pattern}"
                    )
                following = c.steps[i + 1].kind if i + 1 < len(c.steps) else None
                if following != "recover":
                    p.append(
                        f"{key}.schedule: gradual pruning happens during a recover step, "
                        f"which must follow it"
                    )
        elif step.kind in ("recover", "distill"):
            if step.steps is None or step.steps < 1:
                p.append(f"{key}.steps: got {step.steps}; a {step.kind} step needs steps >= 1")
            if not 0.0 <= step.alpha <= 1.0:
                p.append(f"{key}.alpha: got {step.alpha}; allowed: 0 to 1 (weight of the KD loss)")
            if step.temperature <= 0:
                p.append(f"{key}.temperature: got {step.temperature}; must be > 0")
            if job.zero.stage == 3:
                p.append(
                    f"zero.stage: {step.kind} training runs on one task; ZeRO-3 partitions "
                    "nothing there (and its gathered parameters break recovery's fixed "
                    "masks); use zero.stage <= 2"
                )
            if step.kind == "distill":
                p += _student_problems(step, i, key)
        if step.hidden_mse < 0:
            p.append(f"{key}.hidden_mse: got {step.hidden_mse}; must be >= 0 (0: off)")
        elif step.hidden_mse > 0 and step.kind != "distill":
            p.append(
                f"{key}.hidden_mse: hidden-state matching is part of a distill step; "
                f"this step is {step.kind}"
            )
        elif step.hidden_mse > 0 and step.student.hidden_size is not None:
            p.append(
                f"{key}.hidden_mse: the student is narrower than the teacher "
                f"(student.hidden_size={step.student.hidden_size}); hidden states are "
                f"compared as they are, so keep the teacher's width or set hidden_mse: 0"
            )
        elif step.kind == "quantize":
            quantized = True
            check_choice(p, f"{key}.method", step.method, schema.QUANT_METHODS)
            check_choice(p, f"{key}.backend", step.backend, schema.QUANT_BACKENDS)
            if step.backend == "torchao":
                if importlib.util.find_spec("torchao") is None:
                    p.append(f"{key}.backend: torchao is not installed (pip install torchao)")
                if step.method == "weight_only" and step.bits == 8 and step.group_size:
                    p.append(
                        f"{key}.group_size: torchao int8 weight-only is per output "
                        f"channel; remove it"
                    )
            if step.method == "static":
                p += _static_problems(job, step, key)
            if step.method == "dynamic":
                if step.bits not in (None, 8):
                    p.append(f"{key}.bits: dynamic quantisation is int8; got {step.bits}")
                if step.group_size is not None:
                    p.append(f"{key}.group_size: dynamic int8 is per output channel; remove it")
            elif step.method == "weight_only":
                check_choice(p, f"{key}.bits", step.bits, (8, 4))
            if step.group_size is not None and step.group_size < 2:
                p.append(f"{key}.group_size: got {step.group_size}; must be >= 2 (or unset)")
    return p


def _static_problems(job: JobConfig, step: CompressStep, key: str) -> list[str]:
    """Checks of a static int8 step (``compress.static_quant``)."""
    from scilm_hpc.tasks import get_task

    p: list[str] = []
    if step.backend != "torchao":
        p.append(f"{key}.backend: static int8 runs on torchao's PT2E flow; set backend: torchao")
    if step.bits not in (None, 8):
        p.append(f"{key}.bits: static quantisation is int8; got {step.bits}")
    if step.group_size is not None:
        p.append(f"{key}.group_size: static int8 is per output channel; remove it")
    if step.embeddings:
        p.append(f"{key}.embeddings: static int8 keeps the embeddings in float; remove it")
    check_at_least(p, f"{key}.calibration_batches", step.calibration_batches, 1)
    if job.task in schema.TASKS and not get_task(job.task).static_int8:
        p.append(
            f"{key}.method: static int8 is for scoring tasks (classification, token "
            f"classification, regression), not {job.task}; use int8-dynamic, or int4-weight "
            f"for causal LMs"
        )
    return p


def _student_problems(step: CompressStep, index: int, key: str) -> list[str]:
    """Checks of a distill step that need no model (the rest: ``compress.distill``)."""
    p: list[str] = []
    spec = step.student
    if index != 0:
        p.append(
            f"{key}: a distill step trains a student from the dense model; make it the "
            f"first step (steps after it compress the student)"
        )
    if spec.name_or_path:
        shaped = [
            f
            for f in (
                "num_hidden_layers",
                "hidden_size",
                "intermediate_size",
                "num_attention_heads",
            )
            if getattr(spec, f) is not None
        ]
        if shaped or spec.layers:
            p.append(
                f"{key}.student: name_or_path gives the student; remove "
                f"{', '.join(shaped + (['layers'] if spec.layers else []))}"
            )
        return p
    if spec.num_hidden_layers is not None and spec.num_hidden_layers < 1:
        p.append(f"{key}.student.num_hidden_layers: got {spec.num_hidden_layers}; must be >= 1")
    if spec.layers:
        if spec.num_hidden_layers is not None and len(spec.layers) != spec.num_hidden_layers:
            p.append(
                f"{key}.student.layers: {len(spec.layers)} teacher layers given for "
                f"num_hidden_layers {spec.num_hidden_layers}; give one per student layer"
            )
        if len(set(spec.layers)) != len(spec.layers) or min(spec.layers) < 0:
            p.append(f"{key}.student.layers: got {list(spec.layers)}; distinct indices >= 0")
    return p
