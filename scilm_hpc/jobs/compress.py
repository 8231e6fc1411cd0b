"""The compress job: run a recipe's steps on an exported model, measure each, report.

One task. The dense model (``model.name_or_path``, an export) is measured first;
then each step of ``compress.steps`` changes the model in memory and is saved to
``RUN_DIR/steps/NN-name/`` with its measurements (``step.json``, written last). A
restarted job (requeued by Slurm, or the same command run again) loads the last
finished step and goes on; a recovery or distill step resumes from its own
checkpoints. A distill step (first in a recipe) replaces the model by a smaller
student trained from the dense one; the steps after it compress the student.
At the end the last step is copied to ``RUN_DIR/compressed`` and the report is
written.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from scilm_hpc.compress import measure
from scilm_hpc.compress.calibration import calibration_batches, input_norms
from scilm_hpc.compress.distill import build_student, hidden_layer_map
from scilm_hpc.compress.prune import apply_masks, nm_masks, unstructured_masks
from scilm_hpc.compress.quantize import quantize_model
from scilm_hpc.compress.recover import load_student, recovered_model, recovery_job
from scilm_hpc.compress.report import with_ratios, write_report
from scilm_hpc.compress.saving import load_compressed, save_compressed, weights_size
from scilm_hpc.compress.static_quant import static_int8
from scilm_hpc.compress.structured import prune_structured
from scilm_hpc.compress.targets import (
    PRUNABLE_DESCRIPTION,
    prunable_linears,
    structured_stacks,
)
from scilm_hpc.data.dataset import ShardDataset
from scilm_hpc.errors import UserError
from scilm_hpc.evaluate.generation import check_model_fits, generation_metrics
from scilm_hpc.evaluate.inference import dataset_metrics
from scilm_hpc.jobs.startup import rank_session
from scilm_hpc.model_source import load_tokenizer, resolve_model_path
from scilm_hpc.models import build_model, load_for_eval, pad_token_id
from scilm_hpc.rundir import read_json, replace_dir, write_json_atomic
from scilm_hpc.runtime.preemption import StopFlag
from scilm_hpc.runtime.status import write_run_state
from scilm_hpc.schema import CompressStep, JobConfig
from scilm_hpc.tasks import get_task
from scilm_hpc.tasks.seq2seq import Seq2Seq
from scilm_hpc.train.export import write_export
from scilm_hpc.train.recovery import DistillTrainer, RecoveryTrainer

STEP_RECORD = "step.json"


def step_name(step: CompressStep) -> str:
    """The step's ``name``, or one made from its settings (e.g. ``prune-wanda-50``)."""
    if step.name:
        return step.name
    if step.kind == "prune":
        amount = (
            f"{step.n}of{step.m}" if step.pattern == "nm" else f"{100 * (step.sparsity or 0):g}"
        )
        pattern = "" if step.pattern == "unstructured" else f"-{step.pattern}"
        gradual = "-gradual" if step.schedule == "gradual" else ""
        return f"prune-{step.method}{pattern}-{amount}{gradual}"
    if step.kind == "recover":
        return f"recover-{step.steps}"
    if step.kind == "distill":
        layers = step.student.num_hidden_layers or len(step.student.layers)
        return f"distill{f'-{layers}L' if layers else ''}-{step.steps}"
    backend = "-torchao" if step.backend == "torchao" else ""
    if step.method == "dynamic":
        return f"int8-dynamic{backend}"
    if step.method == "static":
        return "int8-static"
    group = f"-g{step.group_size}" if step.group_size else ""
    return f"int{step.bits}-weight{group}{'-emb' if step.embeddings else ''}{backend}"


def architecture(model: Any) -> dict[str, Any]:
    """The model's shape as its config gives it (layers, widths), for the report."""
    fields = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads")
    return {f: getattr(model.config, f, None) for f in fields}


def _check_structured_steps(model: Any, steps: list[CompressStep]) -> None:
    """Refuse, before any work, a structured step the model's blocks cannot take.

    Raises:
        UserError: for a block layout structured pruning does not know, or attention
            heads of an encoder-decoder, naming the step.
    """
    for i, step in enumerate(steps):
        if step.kind == "prune" and step.pattern in ("ffn", "heads"):
            try:
                structured_stacks(model, step.pattern)
            except UserError as exc:
                message = str(exc).removeprefix("compress: ")
                raise UserError(f"compress.steps.{i}.pattern: {message}") from None


class CompressJob:
    """Submitit-callable compression job (one task)."""

    def __init__(self, job: JobConfig) -> None:
        self.job = job

    def __call__(self) -> dict[str, Any]:
        # the finetune job's start-up (signals first, threads by the same rule), on the CPU
        with rank_session(self.job, use_gpu=False) as rank:
            return _Compression(rank.job, rank.stop).run()


class _Compression:
    """One run of a recipe."""

    def __init__(self, job: JobConfig, stop: StopFlag) -> None:
        self.job, self.stop = job, stop
        self.run_dir = Path(job.run.dir)
        self.steps_dir = self.run_dir / "steps"
        c = job.compress
        self.eval_set = ShardDataset(job.data.shards, c.eval_split)
        if self.eval_set.task != job.task:
            raise UserError(
                f"task: the shards were prepared for '{self.eval_set.task}', the job says "
                f"'{job.task}'"
            )
        self.tokenizer, self.dense = load_for_eval(job.model.name_or_path, job.task, self.eval_set)
        prunable_linears(self.dense)  # unsupported layer types fail here, before any work
        _check_structured_steps(self.dense, job.compress.steps)
        self.task = get_task(job.task)
        if self.task.generates:
            check_model_fits(self.dense, self.eval_set, job.model.name_or_path)
        self.pad_id = pad_token_id(self.tokenizer)
        self.batch = measure.latency_batch(self.eval_set, c.latency_batch, self.pad_id, job.task)
        self.threads = c.latency_threads or torch.get_num_threads()

    def _measured(self, model: Any, size_bytes: int, dense_prunable: int | None) -> dict:
        c = self.job.compress
        return {
            **measure.weight_stats(model, dense_prunable),
            "size_bytes": size_bytes,
            "latency_ms": measure.latency_ms(model, self.batch, c.latency_repeats, self.threads),
            "metrics": self._metrics(model),
        }

    def _metrics(self, model: Any) -> dict[str, Any]:
        """The task metrics of ``model`` on the first ``compress.eval_examples`` examples;
        for seq2seq also ROUGE and the generated length (``eval.*`` generation options)."""
        c, job = self.job.compress, self.job
        metrics = dataset_metrics(
            model, self.eval_set, job.task, self.pad_id, job.eval.batch_size, c.eval_examples
        )
        if isinstance(self.task, Seq2Seq):
            limit = c.eval_examples or None
            generated = generation_metrics(
                model, self.tokenizer, self.eval_set, self.task, self.pad_id, job.eval, limit
            )
            assert generated is not None  # one process: rank 0
            metrics.update(generated)
        return metrics

    def run(self) -> dict[str, Any]:
        job, c = self.job, self.job.compress
        write_run_state(self.run_dir, "running", recipe=c.name)
        self.steps_dir.mkdir(parents=True, exist_ok=True)
        recipe = {"name": c.name, "steps": [dataclasses.asdict(s) for s in c.steps]}
        recipe_file = self.steps_dir / "recipe.json"
        before = read_json(recipe_file)  # None: absent, or truncated by a kill
        if before is not None:
            if before != recipe:
                raise UserError(
                    f"run.dir: '{self.run_dir}' holds the steps of another recipe "
                    f"({before['name']}); use a new run.dir, or delete it to start over"
                )
        else:
            write_json_atomic(recipe_file, recipe)
        baseline_file = self.steps_dir / "baseline.json"
        baseline = read_json(baseline_file)
        if baseline is None:
            size = weights_size(resolve_model_path(job.model.name_or_path))
            baseline = self._measured(self.dense, size, None)
            write_json_atomic(baseline_file, baseline)
        model: Any = copy.deepcopy(self.dense)
        model_dir = Path(resolve_model_path(job.model.name_or_path))
        entries: list[dict[str, Any]] = []
        gradual: CompressStep | None = None
        for index, step in enumerate(c.steps):
            name = step_name(step)
            step_dir = self.steps_dir / f"{index + 1:02d}-{re.sub(r'[^A-Za-z0-9_.:-]', '_', name)}"
            spec = dataclasses.asdict(step)
            if step.kind == "prune" and step.schedule == "gradual":
                gradual = step  # reached during the next recover step
                continue
            done = read_json(step_dir / STEP_RECORD)  # None: not finished (or truncated)
            if done is not None:
                if done["spec"] != spec:
                    raise UserError(
                        f"run.dir: '{self.run_dir}' holds step {index + 1} of another recipe "
                        f"({done['name']}); use a new run.dir"
                    )
                entries.append(done["entry"])
                model, model_dir = load_compressed(step_dir), step_dir
                gradual = None
                print(f"step {index + 1} ({name}): done before, loaded", flush=True)
                continue
            start = time.perf_counter()
            print(f"step {index + 1}/{len(c.steps)}: {name}", flush=True)
            changed: list[str]
            if step.kind == "distill":
                result = self._distill(step, index, step_dir)
                if result is None:
                    return {"run_dir": str(self.run_dir), "stopped": f"step {index + 1} ({name})"}
                model, changed = result, list(prunable_linears(result))
            elif step.kind == "recover":
                result = self._recover(step, gradual, model_dir, step_dir)
                if result is None:
                    return {"run_dir": str(self.run_dir), "stopped": f"step {index + 1} ({name})"}
                model, changed = result, []
                gradual = None
            elif step.kind == "prune":
                changed = self._prune(model, step)
            elif step.method == "static":
                linears = prunable_linears(model)
                model, changed = static_int8(model, linears, self._calibration(step)), list(linears)
            else:
                changed = quantize_model(
                    model,
                    prunable_linears(model),
                    step.method or "dynamic",
                    step.bits or 8,
                    step.group_size,
                    step.embeddings,
                    step.backend,
                )
            info = {"recipe": c.name, "steps": [s["name"] for s in entries] + [name]}
            save_compressed(model, self.tokenizer, step_dir, job.task, info)
            entry = with_ratios(
                baseline,
                {
                    "name": name,
                    "kind": step.kind,
                    **self._measured(model, weights_size(step_dir), baseline["prunable_params"]),
                    "modules_changed": len(changed),
                    "seconds": time.perf_counter() - start,
                    **({"architecture": architecture(model)} if step.kind == "distill" else {}),
                },
            )
            write_json_atomic(step_dir / STEP_RECORD, {"name": name, "spec": spec, "entry": entry})
            entries.append(entry)
            model_dir = step_dir
        return self._finish(baseline, entries, model_dir)

    def _calibration(self, step: CompressStep) -> list[dict[str, torch.Tensor]]:
        """``step.calibration_batches`` seeded batches of the train split, as forward inputs."""
        batches = calibration_batches(
            ShardDataset(self.job.data.shards, "train"),
            self.job.task,
            self.pad_id,
            step.calibration_batches,
            self.job.train.micro_batch_size,
            self.job.train.seed,
        )
        return [self.task.forward_inputs(b) for b in batches]

    def _prune(self, model: Any, step: CompressStep) -> list[str]:
        linears = prunable_linears(model)
        for name, linear in linears.items():
            if type(linear) is not nn.Linear:
                raise UserError(
                    f"compress: step prune after quantisation ('{name}' is "
                    f"{type(linear).__name__}); prune first, quantise last"
                )
        norms = None
        if step.method == "wanda":
            train = ShardDataset(self.job.data.shards, "train")
            batches = calibration_batches(
                train,
                self.job.task,
                self.pad_id,
                step.calibration_batches,
                self.job.train.micro_batch_size,
                self.job.train.seed,
            )
            norms = input_norms(model, linears, batches, self.job.task)
        method = step.method or "magnitude"
        if step.pattern in ("ffn", "heads"):
            prune_structured(model, step.pattern, step.sparsity or 0.0, method, norms)
            return list(prunable_linears(model))
        weights = {n: m.weight.detach() for n, m in linears.items()}
        if step.pattern == "nm":
            assert step.n is not None and step.m is not None
            masks = nm_masks(weights, step.n, step.m, method, norms)
        else:
            masks = unstructured_masks(weights, step.sparsity or 0.0, method, step.scope, norms)
        apply_masks(linears, masks)
        return list(masks)

    def _distill(self, step: CompressStep, index: int, step_dir: Path) -> nn.Module | None:
        """Train the smaller student of ``step`` from the dense model; None if stopped.

        The student's starting point is written once to ``NN-name.student/`` (a plain
        HF directory) and trained in ``NN-name.run/`` like a recovery, so a restarted
        job resumes from the run's checkpoints with the same student."""
        init_dir = step_dir.with_name(step_dir.name + ".student")
        key = f"compress.steps.{index}"
        if not (init_dir / "config.json").is_file():
            torch.manual_seed(self.job.train.seed)
            spec = step.student
            if spec.name_or_path:
                self.eval_set.check_tokenizer(
                    load_tokenizer(spec.name_or_path), f"compress.steps.{index}.student"
                )
                task = get_task(self.job.task, self.eval_set.manifest)
                student = build_model(task, spec.name_or_path, self.eval_set.label_names)
            else:
                student = build_student(self.dense, spec, self.job.task, key)
            write_export(student, self.tokenizer, init_dir)
        hidden_layers = None
        if step.hidden_mse > 0:
            from transformers import AutoConfig

            student_config = AutoConfig.from_pretrained(init_dir)
            hidden_layers = hidden_layer_map(self.dense.config, student_config, step.student, key)
        run_dir = step_dir.with_name(step_dir.name + ".run")
        job = recovery_job(self.job, run_dir, init_dir, step.steps or 0)
        trainer = DistillTrainer(job, 0, 1, self.stop, self.dense, step, hidden_layers)
        result = trainer.run()
        if "stopped" in result:
            write_run_state(
                self.run_dir, "stopped", reason=f"{result['stopped']} during {step_dir.name}"
            )
            return None
        return load_student(run_dir / "export", self.job.task).eval()

    def _recover(
        self,
        step: CompressStep,
        gradual: CompressStep | None,
        student_dir: Path,
        step_dir: Path,
    ) -> nn.Module | None:
        """Distil into the model saved in ``student_dir``; None if stopped by a signal."""
        run_dir = step_dir.with_name(step_dir.name + ".run")
        job = recovery_job(self.job, run_dir, student_dir, step.steps or 0)
        trainer = RecoveryTrainer(job, 0, 1, self.stop, self.dense, step, gradual)
        result = trainer.run()
        if "stopped" in result:
            write_run_state(
                self.run_dir, "stopped", reason=f"{result['stopped']} during {step_dir.name}"
            )
            return None
        return recovered_model(student_dir, run_dir / "export", self.job.task, gradual is not None)

    def _finish(
        self, baseline: dict[str, Any], entries: list[dict[str, Any]], model_dir: Path
    ) -> dict[str, Any]:
        job, c = self.job, self.job.compress
        out = self.run_dir / "compressed"
        tmp = out.with_name("compressed.tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        shutil.copytree(model_dir, tmp, ignore=shutil.ignore_patterns(STEP_RECORD))
        replace_dir(tmp, out)
        report = {
            "recipe": c.name,
            "model": job.model.name_or_path,
            "task": job.task,
            "prunable_modules": PRUNABLE_DESCRIPTION,
            "eval": {"split": c.eval_split, "examples": baseline["metrics"]["n_examples"]},
            "latency": {
                "batch_size": int(self.batch["input_ids"].shape[0]),
                "seq_len": int(self.batch["input_ids"].shape[1]),
                "threads": self.threads,
                "repeats": c.latency_repeats,
            },
            "baseline": {**baseline, "architecture": architecture(self.dense)},
            "steps": entries,
            "compressed": str(out),
        }
        write_report(self.run_dir, report)
        write_run_state(self.run_dir, "completed", reason=f"recipe {c.name}: {len(entries)} steps")
        last = entries[-1] if entries else baseline
        metric = get_task(job.task).main_metric[0]
        return {
            "run_dir": str(self.run_dir),
            "compressed": str(out),
            "report": str(self.run_dir / "compress_report.json"),
            "size_ratio": last.get("size_ratio"),
            "speedup": last.get("speedup"),
            metric: last["metrics"].get(metric),
            f"baseline_{metric}": baseline["metrics"].get(metric),
        }
