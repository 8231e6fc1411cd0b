"""The training loop: DeepSpeed engine, steps, periodic evaluation, checkpoints, export.

One ``Trainer`` per rank (the finetune job, ``jobs.finetune``, starts the rank).
The loop runs whole optimizer steps (``gradient_accumulation``
micro-batches each) drawn from ``ResumableBatches``; every ``checkpoint_every`` steps
and at the end it checkpoints; at the end it exports a HF directory and plots the
loss curve. A run directory with a complete checkpoint resumes from it.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scilm_hpc.data.dataset import ShardDataset
from scilm_hpc.data.sampler import ResumableBatches, SamplerPosition
from scilm_hpc.errors import UserError
from scilm_hpc.evaluate.generation import generation_metrics
from scilm_hpc.evaluate.inference import evaluate_split
from scilm_hpc.model_source import load_tokenizer
from scilm_hpc.models import build_model, pad_token_id
from scilm_hpc.rundir import checkpoint_root, read_checkpoint_state
from scilm_hpc.runtime import watchdog
from scilm_hpc.runtime.hardware import cpu_has_native_bf16
from scilm_hpc.runtime.history import append_event
from scilm_hpc.runtime.preemption import StopFlag, requeue, restarts
from scilm_hpc.runtime.status import write_run_state
from scilm_hpc.schema import JobConfig
from scilm_hpc.tasks import get_task
from scilm_hpc.tasks.base import class_weight_tensor
from scilm_hpc.tasks.seq2seq import Seq2Seq
from scilm_hpc.train import checkpoint as ckpt
from scilm_hpc.train.cpu_adam import realign_after_resume
from scilm_hpc.train.ds_config import cpu_autocast, deepspeed_config
from scilm_hpc.train.evaluation import dev_generation, is_better
from scilm_hpc.train.export import export_model
from scilm_hpc.train.flops import ModelFlops, throughput_row
from scilm_hpc.train.lora import export_lora, lora_enabled, lora_model, trainable_parameters
from scilm_hpc.train.memory import compile_model, enable_gradient_checkpointing, peak_memory
from scilm_hpc.train.progress import Progress
from scilm_hpc.train.report import MetricsLog, plot_loss
from scilm_hpc.train.schedule import StepSchedule, scheduler_factory
from scilm_hpc.train.stragglers import StragglerDetector, straggler_message
from scilm_hpc.train.tensorboard import wanted

#: Where each rank's own slot starts in a step's all-reduced totals (after loss, tokens,
#: examples, stop flag, squared lengths): one slot per rank (``train.stragglers``).
RANK_SLOTS = 5


@dataclass
class RunProgress:
    """Where one rank's run stands; checkpoints save all of it but ``last_saved``."""

    step: int
    position: SamplerPosition
    best: dict[str, Any]
    patience_left: int
    last_saved: int = -1


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """``batch`` on ``device`` (the same tensors where they are already there: CPU ranks
    copy nothing)."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


class Trainer:
    """State of one rank's training run.

    Subclasses change what is trained and how the loss is computed by overriding
    ``build_model`` and ``compute_loss`` (compression recovery distils from a teacher
    this way) and keep everything else: sampler, checkpoints, preemption, export.
    """

    def __init__(self, job: JobConfig, rank: int, world: int, on_gpu: bool, stop: StopFlag) -> None:
        self.flops: ModelFlops  # the model's FLOPs count, set with the engine
        self.job, self.rank, self.world, self.on_gpu = job, rank, world, on_gpu
        self.stop = stop
        self.run_dir = Path(job.run.dir)
        self.tokenizer = load_tokenizer(job.model.name_or_path, job.model.revision)
        self.train_set = ShardDataset(job.data.shards, "train")
        self.train_set.check_tokenizer(self.tokenizer, job.model.name_or_path)
        if self.train_set.task != job.task:
            raise UserError(
                f"task: shards in '{job.data.shards}' were prepared for task "
                f"'{self.train_set.task}', the job says '{job.task}'"
            )
        has_dev = "dev" in self.train_set.manifest["splits"]
        self.dev_set = ShardDataset(job.data.shards, "dev") if has_dev else None
        self.labels = self.train_set.label_names
        t = job.train
        self.batches = ResumableBatches(
            self.train_set.lengths(),
            t.micro_batch_size,
            t.gradient_accumulation,
            world,
            rank,
            t.seed,
            t.length_bucketing,
        )
        if self.batches.steps_per_epoch == 0:
            raise UserError(
                f"train.micro_batch_size: {len(self.train_set)} training examples "
                f"are fewer than one optimizer step takes "
                f"({self.batches.samples_per_step} = micro x accumulation x ranks)"
            )
        self.total_steps = (
            t.max_steps if t.max_steps > 0 else t.epochs * self.batches.steps_per_epoch
        )
        self.pad_id = pad_token_id(self.tokenizer)
        self.task = get_task(job.task, self.train_set.manifest).for_job(job)
        class_weight_tensor(job.train.class_weights, self.labels)  # unknown names: fail now
        self.log = MetricsLog(
            self.run_dir / "metrics.jsonl",
            enabled=rank == 0,
            tensorboard_dir=self.run_dir / "tensorboard" if wanted(job.train.tensorboard) else None,
        )
        self._last_eval_step = -1
        self._last_eval: dict[str, Any] | None = None
        self._step_lr = 0.0  # the learning rate of the step being logged
        self.stragglers = StragglerDetector(t.straggler_factor)

    def _engine(self, resume_tag: str | None) -> tuple[Any, dict[str, Any]]:
        import deepspeed

        job = self.job
        state: dict[str, Any] = {}
        weights = None
        if resume_tag is not None:
            state = read_checkpoint_state(self.run_dir, resume_tag)
            if state["world_size"] != self.world:
                warnings.warn(
                    f"resuming {resume_tag} saved on {state['world_size']} rank(s) on "
                    f"{self.world}: model weights, scheduler and data position are "
                    f"restored, the optimizer state (Adam moments) starts fresh",
                    stacklevel=1,
                )
                weights = ckpt.consolidated_weights(self.run_dir, resume_tag, state["zero_stage"])
        torch.manual_seed(job.train.seed)  # new heads start the same on every rank and run
        model = self.build_model(weights)
        self.flops = ModelFlops.of(model)
        if job.train.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        if job.train.compile:
            compile_model(model)
        config = deepspeed_config(job, self.on_gpu)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            engine, _, _, _ = deepspeed.initialize(
                model=model,
                config=config,
                model_parameters=[p for p in model.parameters() if p.requires_grad],
                lr_scheduler=scheduler_factory(job, self.total_steps, config),
            )
        if resume_tag is not None:
            if weights is None:
                engine.load_checkpoint(
                    str(checkpoint_root(self.run_dir)),
                    tag=resume_tag,
                    load_optimizer_states=True,
                    load_lr_scheduler_states=True,
                )
                realign_after_resume(engine)  # CPU offload: DeepSpeed's CPU Adam step counter
            else:
                engine.lr_scheduler.load_state_dict(state["scheduler"])
                engine.global_steps = state["step"]
            if isinstance(engine.lr_scheduler, StepSchedule):
                engine.lr_scheduler.apply()  # ZeRO loads its optimizer state (rates) last
            ckpt.load_rng(self.run_dir, resume_tag, self.rank)
        return engine, state

    def build_model(self, weights: dict[str, torch.Tensor] | None) -> torch.nn.Module:
        """The model to train (``weights``: consolidated weights to start from instead);
        with ``model.lora`` wrapped by peft, only the adapters and a new head training."""
        job = self.job
        if lora_enabled(job.model.lora):
            model = lora_model(job, self.labels, weights)
            if self.rank == 0:
                trainable, total = trainable_parameters(model)
                print(f"LoRA: {trainable} of {total} parameters train", flush=True)
            return model
        return build_model(
            self.task,
            job.model.name_or_path,
            self.labels,
            job.model.revision,
            state_dict=weights,
            decoder_name_or_path=job.model.decoder_name_or_path,
        )

    def compute_loss(self, engine: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The loss of one micro-batch (the task's training loss: the model's own unless
        ``train.loss`` / ``train.class_weights`` change it)."""
        out = engine(**self.task.model_inputs(batch, engine))
        return self.task.training_loss(out, batch, self.job.train, self.labels)

    def _precision_context(self) -> Callable[[], contextlib.AbstractContextManager[Any]]:
        """What ``compute_loss`` runs in: bf16 autocast on CPU ranks with
        ``train.precision=bf16`` (weights and optimizer stay fp32), else nothing."""
        if not cpu_autocast(self.job, self.on_gpu):
            return contextlib.nullcontext
        if self.rank == 0 and not cpu_has_native_bf16():
            warnings.warn(
                "train.precision=bf16: this CPU has no native bf16 matrix multiply "
                "(AVX-512 BF16 or AMX); bf16 is emulated and usually slower than fp32 here",
                stacklevel=1,
            )
        return functools.partial(torch.autocast, "cpu", dtype=torch.bfloat16)

    def _skip_lone_allreduce(self, engine: Any) -> None:
        """One rank without ZeRO: skip DeepSpeed's gradient all-reduce, which would
        flatten every gradient into one buffer, scale it by 1, "reduce" it over one
        rank and copy it back each step (about a tenth of a CPU step; the gradients are
        bit-identical without it). ZeRO stages 1-3 reduce inside their optimizer."""
        if self.world == 1 and self.job.zero.stage_for(self.world) == 0:
            engine.enable_backward_allreduce = False

    def run(self) -> dict[str, Any]:
        """Train to ``total_steps`` (or an early stop, or a stop signal), then export."""
        engine, run = self._start()
        engine.train()
        stream = self.batches.step_batches(run.position)
        precision = self._precision_context()
        self._skip_lone_allreduce(engine)
        progress = Progress(self.total_steps, run.step, enabled=self.rank == 0)
        early_stop = False
        while run.step < self.total_steps:
            tick = time.perf_counter()
            totals, data_s, micro = self._train_step(engine, stream, run, precision)
            watchdog.beat(run.step)
            self._check_stragglers(run.step, totals)
            row = self._log_step(engine, run, totals, data_s, micro, time.perf_counter() - tick)
            progress.update(run.step, totals[2].item(), row)
            early_stop = self._evaluate_if_due(engine, run)
            if self.job.train.checkpoint_every and run.step % self.job.train.checkpoint_every == 0:
                self._save_once(engine, run)
            if totals[3].item() > 0:  # a rank was signalled before this step's all-reduce
                self._save_once(engine, run)
                progress.close()
                with watchdog.phase("leave", run.step, then="idle"):
                    return self._leave(run.step)
            if early_stop:
                t = self.job.train
                print(
                    f"early stopping at step {run.step}: {t.best_metric} has not improved for "
                    f"{t.early_stopping_patience} evaluations",
                    flush=True,
                )
                break
        progress.close()
        with watchdog.phase("finish", run.step, then="idle"):
            return self._finish(engine, run, early_stop)

    def _start(self) -> tuple[Any, RunProgress]:
        """The engine and where the run stands: from the agreed checkpoint, or fresh."""
        resume_tag = ckpt.agree_on_resume_tag(self.run_dir, self.rank)
        engine, state = self._engine(resume_tag)
        run = RunProgress(
            step=int(state.get("step", 0)),
            position=SamplerPosition(**state["position"]) if state else SamplerPosition(),
            best=state.get("best", {"tag": None, "value": None}),
            patience_left=int(state.get("patience_left", self.job.train.early_stopping_patience)),
        )
        run.last_saved = run.step if resume_tag else -1
        if self.rank == 0:
            if resume_tag:
                self.log.truncate_after(run.step)
            else:
                self.log.set_aside()
            write_run_state(self.run_dir, "running", step=run.step, restarts=restarts())
            if resume_tag:
                print(
                    f"resuming from {resume_tag} (step {run.step}, epoch {run.position.epoch})",
                    flush=True,
                )
        return engine, run

    def _train_step(
        self,
        engine: Any,
        stream: Iterator[tuple[SamplerPosition, list[Any]]],
        run: RunProgress,
        precision: Callable[[], contextlib.AbstractContextManager[Any]],
    ) -> tuple[torch.Tensor, float, int]:
        """One optimizer step. Returns the step's totals summed over ranks (loss, tokens,
        examples, stop flag, squared lengths, then each rank's seconds of work before its
        first collective (``train.stragglers``): one all-reduce for all of them), this rank's
        data seconds (drawing indices, reading, collating) and its number of micro-batches."""
        import torch.distributed as dist

        data_tick = time.perf_counter()
        run.position, micro_batches = next(stream)
        lengths = self.train_set.lengths()  # real tokens per example, without padding
        loss_total, tokens, squared, data_s, forward_s = 0.0, 0, 0, 0.0, 0.0
        self._step_lr = engine.get_lr()[0]  # this step's rate (the engine steps it after)
        for indices in micro_batches:
            batch = to_device(
                self.task.collate([self.train_set[int(i)] for i in indices], self.pad_id),
                engine.device,  # the rank's GPU, or the CPU
            )
            forward_tick = time.perf_counter()
            data_s += forward_tick - data_tick
            with precision():
                loss = self.compute_loss(engine, batch)
            forward_s += time.perf_counter() - forward_tick
            engine.backward(loss)
            engine.step()
            loss_total += loss.item()
            tokens += int(lengths[indices].sum())
            squared += int((lengths[indices].astype(np.int64) ** 2).sum())  # attention FLOPs
            data_tick = time.perf_counter()
        run.step += 1
        local_s = [0.0] * self.world  # this rank's slot: the others add theirs
        local_s[self.rank] = data_s + forward_s
        totals = torch.tensor(
            [
                loss_total,
                tokens,
                sum(map(len, micro_batches)),
                self.stop.local_flag(),
                squared,
                *local_s,
            ],
            dtype=torch.float64,
            device=engine.device,  # NCCL reduces device tensors only
        )
        watchdog.at_allreduce(run.step)
        dist.all_reduce(totals)
        return totals, data_s, len(micro_batches)

    def _log_step(
        self,
        engine: Any,
        run: RunProgress,
        totals: torch.Tensor,
        data_s: float,
        micro: int,
        elapsed: float,
    ) -> dict[str, Any] | None:
        """The ``metrics.jsonl`` row of this step, every ``log_every`` steps and at the end."""
        if run.step % self.job.train.log_every and run.step != self.total_steps:
            return None
        samples_per_epoch = self.batches.steps_per_epoch * self.batches.samples_per_step
        row = {
            "step": run.step,
            "epoch": run.position.epoch + run.position.samples_in_epoch / samples_per_epoch,
            "loss": totals[0].item() / (micro * self.world),
            "lr": self._step_lr,  # the rate this step ran at
            "samples_per_s": totals[2].item() / elapsed,
            "tokens_per_s": totals[1].item() / elapsed,
            "samples": int(totals[2].item()),  # this step's, all ranks
            "tokens": int(totals[1].item()),  # real tokens, no padding
            "step_s": elapsed,
            **throughput_row(
                self.flops,
                totals[1].item(),
                totals[4].item(),
                totals[2].item(),
                elapsed,
                self.world,
                self.job.train.peak_tflops,
            ),
            "data_s_per_step": data_s,
            "data_fraction": data_s / elapsed,
            # each rank's data + forward seconds (work before its first collective)
            "rank_local_s": [round(x, 4) for x in totals[RANK_SLOTS:].tolist()],
            **peak_memory(self.on_gpu),  # rank 0's
        }
        self.log.write(row)
        return row

    def _check_stragglers(self, step: int, totals: torch.Tensor) -> None:
        """Rank 0 warns about, and records, a rank persistently slower than the others."""
        if self.rank != 0 or self.world < 2:
            return
        for rank, seconds, typical in self.stragglers.update(totals[RANK_SLOTS:].tolist()):
            message = straggler_message(
                rank, seconds, typical, self.job.train.straggler_factor, self.stragglers.window
            )
            print(f"warning: step {step}: {message}", file=sys.stderr, flush=True)
            append_event(
                self.run_dir,
                "straggler",
                rank=rank,
                step=step,
                local_s=round(seconds, 4),
                median_s=round(typical, 4),
                reason=message,
            )

    def _evaluate_if_due(self, engine: Any, run: RunProgress) -> bool:
        """Dev evaluation every ``eval_every`` steps; with ``best_metric``, keep the best
        checkpoint and count patience. Returns whether to stop early."""
        import torch.distributed as dist

        t = self.job.train
        if not (t.eval_every and run.step % t.eval_every == 0 and self.dev_set is not None):
            return False
        metrics = self._evaluate(engine, run.step)
        if not t.best_metric:
            return False
        # metrics exist on rank 0 only: it decides, every rank follows (saving and
        # stopping are collective)
        decision: list[Any] = [None]
        if self.rank == 0:
            assert metrics is not None
            value = metrics.get(t.best_metric)
            improved, stop = is_better(value, run.best["value"], t.best_metric), False
            if improved:
                run.best = {"tag": f"step_{run.step}", "value": value}
                run.patience_left = t.early_stopping_patience
            elif t.early_stopping_patience:
                run.patience_left -= 1
                stop = run.patience_left <= 0
            decision = [(run.best, run.patience_left, improved, stop)]
        dist.broadcast_object_list(decision, src=0)
        run.best, run.patience_left, improved, stop = decision[0]
        if improved:
            self._save_once(engine, run)
        return bool(stop)

    def _save_once(self, engine: Any, run: RunProgress) -> None:
        """Checkpoint the current step unless it is saved already."""
        if run.last_saved != run.step:
            with watchdog.phase("save", run.step):
                self._save(engine, run.step, run.position, run.best, run.patience_left)
            run.last_saved = run.step

    def _finish(self, engine: Any, run: RunProgress, early_stop: bool) -> dict[str, Any]:
        """Last checkpoint, final dev metrics, export, loss plot, completed state."""
        self._save_once(engine, run)
        final = None
        if self.dev_set is not None:
            final = (
                self._last_eval
                if self._last_eval_step == run.step
                else self._evaluate(engine, run.step)
            )
        job = self.job
        if lora_enabled(job.model.lora):
            export_lora(engine, job, self.labels, self.tokenizer, self.run_dir / "export")
        else:
            export_model(
                engine, self.tokenizer, self.run_dir / "export", job.zero.stage_for(self.world)
            )
        if self.rank == 0:
            plot_loss(self.run_dir / "metrics.jsonl", self.run_dir / "plots" / "loss.png")
            write_run_state(
                self.run_dir,
                "completed",
                step=run.step,
                reason="early stopping" if early_stop else "reached the last step",
            )
        return {
            "run_dir": str(self.run_dir),
            "step": run.step,
            "ranks": self.world,
            "export": str(self.run_dir / "export"),
            "dev": final,
            "best": run.best,
        }

    def _leave(self, step: int) -> dict[str, Any]:
        """After a preemption / time-limit checkpoint: requeue (rank 0) or stop."""
        import torch.distributed as dist

        signal_name = self.stop.signal_name or "a signal on another rank"
        requeued, reason = False, ""
        if self.rank == 0:
            requeued, reason = requeue(self.job.cluster.max_requeues)
            write_run_state(
                self.run_dir,
                "requeued" if requeued else "stopped",
                step=step,
                reason=f"{signal_name} at step {step}: {reason}",
            )
            print(f"stopping at step {step} ({signal_name}): {reason}", flush=True)
        decision = [requeued]
        dist.broadcast_object_list(decision, src=0)
        if decision[0]:
            # Slurm restarts the batch script; leave without writing a result for submitit.
            os._exit(0)
        return {
            "run_dir": str(self.run_dir),
            "step": step,
            "stopped": signal_name,
            "reason": reason,
        }

    def _evaluate(self, engine: Any, step: int) -> dict[str, Any] | None:
        assert self.dev_set is not None
        engine.eval()
        with watchdog.phase("evaluate", step):
            metrics = evaluate_split(
                engine,
                self.dev_set,
                self.task,
                self.labels,
                self.pad_id,
                self.job.eval.batch_size,
                self.rank,
                self.world,
            )
            generated = self._dev_generation(engine)
        if metrics is not None and generated is not None:
            metrics.update(generated)
        engine.train()
        self._last_eval_step = step
        self._last_eval = None
        if metrics is not None:
            self._last_eval = {
                "step": step,
                **{f"dev_{k}": v for k, v in metrics.items() if isinstance(v, float | int)},
            }
            self.log.write(self._last_eval)
        return self._last_eval

    def _dev_generation(self, engine: Any) -> dict[str, Any] | None:
        """Dev ROUGE when ``train.dev_generate`` or a ROUGE ``train.best_metric`` asks for it
        (``evaluation.dev_generation``: how many examples); the metrics on rank 0, None
        elsewhere or when not asked."""
        limit = dev_generation(self.job)
        if limit is None:
            return None
        assert self.dev_set is not None and isinstance(self.task, Seq2Seq)
        return generation_metrics(
            engine,
            self.tokenizer,
            self.dev_set,
            self.task,
            self.pad_id,
            self.job.eval,
            limit or None,
            self.rank,
            self.world,
            synced=self.world > 1 and self.job.zero.stage_for(self.world) == 3,
        )

    def _save(
        self,
        engine: Any,
        step: int,
        position: SamplerPosition,
        best: dict[str, Any],
        patience_left: int,
    ) -> None:
        state = {
            "step": step,
            "position": vars(position),
            "world_size": self.world,
            "zero_stage": self.job.zero.stage_for(self.world),
            "best": best,
            "patience_left": patience_left,
            "scheduler": engine.lr_scheduler.state_dict(),
        }
        keep = {best["tag"]} if best["tag"] else set()
        ckpt.save_checkpoint(
            engine, self.run_dir, step, state, self.rank, self.job.train.keep_last, keep
        )
        if self.rank == 0:
            print(f"checkpoint step_{step} saved", flush=True)
