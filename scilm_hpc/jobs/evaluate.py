"""The evaluate job: dense (or compressed) models on a split of the shards, over MPI ranks.

Each rank takes a contiguous, token-balanced range of the split's examples, runs
batched inference (length-sorted, dynamic padding), and sends its per-example results
to rank 0, which orders them by example and only then computes metrics, so the
metrics are identical for any number of ranks. Rank 0 writes ``eval.json``,
``eval.md``, ``plots/confusion_matrix.png`` (classification) and, if asked,
``predictions.jsonl``. Every input check (split, tokenizer, label map) runs before
any inference.

    mpirun -n 2 python -m scilm_hpc.jobs.evaluate RUN_DIR/evaluate.config.yaml
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from scilm_hpc.config import load_and_validate
from scilm_hpc.data.dataset import ShardDataset
from scilm_hpc.errors import UserError
from scilm_hpc.evaluate.generation import check_model_fits, generate_predictions
from scilm_hpc.evaluate.inference import predict, token_balanced_ranges
from scilm_hpc.evaluate.metrics import metrics_from_results
from scilm_hpc.evaluate.report import write_reports
from scilm_hpc.models import load_for_eval, pad_token_id
from scilm_hpc.runtime.console import SUMMARY_ENV, CountProgress
from scilm_hpc.runtime.dist import Communicator, communicator
from scilm_hpc.runtime.hardware import cpu_threads
from scilm_hpc.runtime.ownership import take_run_lock_over
from scilm_hpc.schema import JobConfig
from scilm_hpc.tasks import get_task
from scilm_hpc.tasks.seq2seq import Seq2Seq


class EvaluateJob:
    """Submitit- and mpirun-callable evaluation (one call per rank)."""

    def __init__(self, job: JobConfig) -> None:
        self.job = job

    def __call__(self) -> dict[str, Any]:
        job = self.job
        run_dir = Path(job.run.dir)
        comm = communicator(run_dir.absolute(), job.cluster.collective_timeout_s)
        # one run per directory: a second evaluation (or a finetune / compress still
        # running there) is refused on every rank before anything is read or written
        lock = take_run_lock_over(run_dir, "evaluate", comm)
        try:
            return self._evaluate(comm, run_dir)
        finally:
            if lock is not None:
                lock.release()

    def _evaluate(self, comm: Communicator, run_dir: Path) -> dict[str, Any]:
        job = self.job
        if comm.world_size > 1:
            torch.set_num_threads(cpu_threads(job) or torch.get_num_threads())
        dataset = ShardDataset(job.data.shards, job.eval.split)
        if dataset.task != job.task:
            raise UserError(
                f"task: the shards were prepared for '{dataset.task}', the job says '{job.task}'"
            )
        names = [job.model.name_or_path, *job.eval.models]
        loaded = [load_for_eval(name, job.task, dataset) for name in names]
        task = get_task(job.task)
        if task.generates:
            for name, (_, model) in zip(names, loaded, strict=True):
                check_model_fits(model, dataset, name)
        mine = token_balanced_ranges(dataset.lengths(), comm.world_size)[comm.rank]
        evaluations = []
        for name, (tokenizer, model) in zip(names, loaded, strict=True):
            pad_id = pad_token_id(tokenizer)
            start = time.perf_counter()
            if isinstance(task, Seq2Seq):
                results = generate_predictions(
                    model,
                    tokenizer,
                    dataset,
                    task,
                    pad_id,
                    job.eval,
                    comm.rank,
                    comm.world_size,
                    score=job.eval.target_loss,
                )
            else:
                progress = CountProgress(
                    f"evaluate rank {comm.rank} ({Path(name).name or name})",
                    "examples",
                    len(mine),
                    enabled=comm.rank == 0,
                )
                results = predict(
                    model, dataset, mine, task, pad_id, job.eval.batch_size, progress.update
                )
                progress.close()
            seconds = time.perf_counter() - start
            gathered = comm.gather((results, seconds))
            if comm.rank == 0:
                assert gathered is not None
                merged = sorted(
                    (item for part, _ in gathered for item in part), key=lambda item: item[0]
                )
                if [i for i, _ in merged] != list(range(len(dataset))):
                    raise RuntimeError("ranks returned duplicated or missing examples")
                wall = max(s for _, s in gathered)
                evaluations.append(
                    {
                        "model": name,
                        "metrics": metrics_from_results(
                            job.task, [r for _, r in merged], dataset.label_names
                        ),
                        "examples_per_s": len(dataset) / wall if wall else None,
                        # each rank's inference time (start-up and loading not counted)
                        "rank_seconds": [round(s, 3) for _, s in gathered],
                        "predictions": [r for _, r in merged],
                    }
                )
        summary: dict[str, Any] = {}
        if comm.rank == 0:
            summary = write_reports(run_dir, job, dataset, evaluations, comm.world_size)
        comm.close()
        return summary


def main(argv: list[str] | None = None) -> int:
    """``python -m scilm_hpc.jobs.evaluate CONFIG.yaml``: one MPI rank of an evaluation."""

    args = sys.argv[1:] if argv is None else argv
    try:
        summary = EvaluateJob(load_and_validate(args[0], args[1:], job="evaluate"))()
    except UserError as exc:
        for line in exc.problems:
            print(f"error: {line}", file=sys.stderr)
        return 2
    if summary and os.environ.get(SUMMARY_ENV) != "0":
        print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
