"""The compression table of AntiBERTy fine-tuned on antiberta-paratope: dense, bf16, int8
dynamic, Wanda 50% + recovery, a 4-layer distilled student; test PR-AUC, MCC, size, CPU
latency.

First ``scilm import-model antiberty``, ``scilm prepare`` and ``scilm finetune`` exactly
as ``benchmarks/protein.py`` does for the paratope task (its functions, its budget
options; no HF Trainer run here), then one ``scilm compress`` run of the export per
shipped recipe, all with ``compress.eval_split=test`` (the first ``--test-examples``
chains; 0 = all 90) and latency on ``--threads`` threads (median of ``--repeats``
forward passes of one fixed batch of the first 32 test chains):

* ``int8-dynamic``: the int8 dynamic row;
* ``prune50-recover`` (Wanda 50% unstructured, ``--recover-steps`` of distillation
  recovery from the dense model, then int8 dynamic): the row after recovery (fp32
  weights, half of them zero) and, as a further row, the recipe's end (+ int8);
* ``distill-half`` with ``student.num_hidden_layers=4`` (AntiBERTy has 8 layers, so
  this is the recipe's half, stated explicitly) and ``--distill-steps`` steps.

Every ``scilm compress`` run measures the dense export itself in the same process, so
each row's speed-up is against a dense latency taken in the same run; the dense row is
the int8-dynamic run's baseline.

bf16: the suite has no compression step, quantisation method or evaluation option that
makes or scores a bf16 copy of a model (bf16 exists only as ``train.precision``), so
this benchmark measures it itself: the dense export cast to ``torch.bfloat16``, scored by
the compress job's metric code (``evaluate.inference.dataset_metrics``, logits cast back
to fp32 before the metrics), timed by its latency code (``compress.measure.latency_batch``
and ``latency_ms``, same batch, repeats and threads) against the fp32 export timed the
same way in the same process, its size that of the weights ``save_pretrained`` writes
(``compress.saving.weights_size``, as for the other rows). On a CPU without native bf16
matrix multiplies torch emulates them, so expect bf16 slower than fp32 there.

    python benchmarks/protein_compress.py [--max-steps 40] [--recover-steps 120]
        [--distill-steps 120] [--test-examples 0] [--repeats 20] [--threads 2]

At the defaults this should take 15-20 minutes on 2 uncontended cores (estimated from a
contended smoke run: a recovery step costs ~1.8 fine-tuning steps, a distillation step
to 4 layers less; see the JSON line's ``s_per_step`` for the measured figures).

``--export RUN/export --shards SHARDS`` (together) skip the fine-tuning and compress that
paratope model instead (e.g. ``OUT/paratope/scilm`` of ``benchmarks/protein.py``); with
the ``--out`` of an earlier run, ``scilm compress`` takes up each recipe's finished steps
(same options) instead of redoing them.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import _common as bench
import protein

TASK = "token_classification"
METRICS = ("pr_auc", "mcc")


def compress(
    recipe: str, export: Path, shards: Path, run_dir: Path, args: Any, *overrides: str
) -> dict[str, Any]:
    """One ``scilm compress`` run of ``recipe`` on the test split; its report and wall s."""
    start = time.perf_counter()
    bench.run(
        bench.job_command(
            "compress",
            f"run.dir={run_dir}",
            f"model.name_or_path={export}",
            f"data.shards={shards}",
            "cluster=none",
            f"task={TASK}",
            f"compress={recipe}",
            "compress.eval_split=test",
            f"compress.eval_examples={args.test_examples}",
            f"compress.latency_repeats={args.repeats}",
            f"compress.latency_threads={args.threads}",
            f"train.micro_batch_size={args.batch}",
            f"train.seed={args.seed}",
            "train.log_every=1",
            *overrides,
        ),
        log=run_dir.with_suffix(".log"),
    )
    report = json.loads((run_dir / "compress_report.json").read_text())
    return {**report, "wall_s": time.perf_counter() - start}


def training_s_per_step(run_dir: Path) -> dict[str, float]:
    """Median seconds per optimizer step of each recovery or distillation step of a
    compress run (their ``metrics.jsonl``), by step directory name."""
    return {
        d.name.removesuffix(".run"): round(bench.median(r["step_s"] for r in bench.step_rows(d)), 3)
        for d in sorted((run_dir / "steps").glob("*.run"))
        if bench.step_rows(d)
    }


def bf16_figures(export: Path, shards: Path, out: Path, args: Any) -> dict[str, Any]:
    """The dense export and its bf16 cast, each measured as the compress job measures a
    step (metrics, size, latency): ``{"dense": {...}, "bf16": {...}}``."""
    import torch

    from scilm_hpc.compress import measure
    from scilm_hpc.compress.saving import weights_size
    from scilm_hpc.data.dataset import ShardDataset
    from scilm_hpc.evaluate.inference import dataset_metrics
    from scilm_hpc.models import load_for_eval, pad_token_id

    test = ShardDataset(shards, "test")
    tokenizer, model = load_for_eval(str(export), TASK, test)
    pad_id = pad_token_id(tokenizer)
    batch = measure.latency_batch(test, 32, pad_id, TASK)
    figures = {}
    for name in ("dense", "bf16"):
        if name == "bf16":
            model = model.to(torch.bfloat16)
            model.save_pretrained(out / "bf16")
            size = weights_size(out / "bf16")
            # the metrics read the logits as fp32 (numpy has no bf16); the cast is not timed
            hook = model.register_forward_hook(
                lambda m, i, o: o.__setitem__("logits", o.logits.float())
            )
        else:
            size, hook = weights_size(export), None
        metrics = dataset_metrics(model, test, TASK, pad_id, 64, args.test_examples)
        if hook is not None:
            hook.remove()
        figures[name] = {
            "metrics": metrics,
            "size_bytes": size,
            "latency_ms": measure.latency_ms(model, batch, args.repeats, args.threads),
        }
    figures["bf16"]["speedup"] = figures["dense"]["latency_ms"] / figures["bf16"]["latency_ms"]
    return figures


def row(step: dict[str, Any], dense: dict[str, Any], speedup: float, wall_s: float) -> dict:
    """A table row: test metrics, size, latency and speed-up against ``dense`` (the dense
    model measured in the same process as ``step``)."""
    return {
        **{f"test_{k}": round(float(step["metrics"][k]), 4) for k in METRICS},
        "size_mb": round(step["size_bytes"] / 1e6, 2),
        "latency_ms": round(step["latency_ms"], 1),
        "dense_latency_ms": round(dense["latency_ms"], 1),
        "speedup": round(speedup, 2),
        "wall_s": round(wall_s, 1),
    }


def table_rows(reports: dict[str, dict[str, Any]], bf16: dict[str, Any]) -> dict[str, dict]:
    """The rows of the table from the three compress reports and the bf16 figures."""

    def step(report: dict[str, Any], kind: str) -> dict[str, Any]:
        return next(s for s in report["steps"] if s["kind"] == kind)

    int8, pruned, student = (reports[r] for r in ("int8-dynamic", "prune50-recover", "distill"))
    recovered = step(pruned, "recover")
    distilled = step(student, "distill")
    rows = {
        "dense": row(int8["baseline"], int8["baseline"], 1.0, 0.0),
        "bf16": row(bf16["bf16"], bf16["dense"], bf16["bf16"]["speedup"], 0.0),
        "int8 dynamic": row(
            step(int8, "quantize"), int8["baseline"], step(int8, "quantize")["speedup"], 0.0
        ),
        "Wanda 50% + recovery": row(
            recovered, pruned["baseline"], recovered["speedup"], recovered["seconds"]
        ),
        "Wanda 50% + rec. + int8": row(
            pruned["steps"][-1], pruned["baseline"], pruned["steps"][-1]["speedup"], 0.0
        ),
        "4-layer student": row(
            distilled, student["baseline"], distilled["speedup"], distilled["seconds"]
        ),
    }
    rows["Wanda 50% + recovery"]["sparsity"] = round(recovered["sparsity"], 3)
    rows["4-layer student"]["layers"] = distilled["architecture"]["num_hidden_layers"]
    return rows


def main() -> None:
    parser = bench.command_line(
        __doc__,
        max_steps=40,
        batch=16,
        lr=5e-5,
        seed=42,
        recover_steps=120,
        distill_steps=120,
        test_examples=0,
        repeats=20,
        threads=2,
        export=(Path, None),
        shards=(Path, None),
        out=None,
    )
    args = parser.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    start = time.perf_counter()
    out = bench.work_dir(args.out, "protein-compress")
    if (args.export is None) != (args.shards is None):
        sys.exit("give --export and --shards together (or neither)")
    export, shards, finetune_s, train_s_per_step = args.export, args.shards, 0.0, 0.0
    if export is None:
        model_dir = protein.import_antiberty(out)
        run_dir, shards, finetune_s = protein.scilm_finetune("paratope", model_dir, out, args)
        export = run_dir / "export"
        train_s_per_step = bench.median(r["step_s"] for r in bench.step_rows(run_dir))
    runs = {
        "int8-dynamic": ("int8-dynamic",),
        "prune50-recover": ("prune50-recover", f"compress.steps.1.steps={args.recover_steps}"),
        "distill": (
            "distill-half",
            f"compress.steps.0.steps={args.distill_steps}",
            "compress.steps.0.student.num_hidden_layers=4",
        ),
    }
    reports = {}
    for name, (recipe, *overrides) in runs.items():
        reports[name] = compress(recipe, export, shards, out / "compress" / name, args, *overrides)
        print(f"{name}: {reports[name]['wall_s']:.0f} s", flush=True)
    bf16 = bf16_figures(export, shards, out, args)
    rows = table_rows(reports, bf16)
    columns = ["PR-AUC", "MCC", "size MB", "latency ms", "speed-up"]
    keys = ["test_pr_auc", "test_mcc", "size_mb", "latency_ms", "speedup"]
    print(
        f"AntiBERTy on antiberta-paratope, {args.max_steps} fine-tuning steps of {args.batch}; "
        f"test chains: {int(reports['int8-dynamic']['baseline']['metrics']['n_examples'])}; "
        f"latency: batch of 32, {args.threads} threads, median of {args.repeats}"
    )
    bench.table(columns, {name: [r[k] for k in keys] for name, r in rows.items()})
    figures = {
        "benchmark": "protein_compress",
        "max_steps": args.max_steps,
        "batch": args.batch,
        "recover_steps": args.recover_steps,
        "distill_steps": args.distill_steps,
        "threads": args.threads,
        "test_examples": int(reports["int8-dynamic"]["baseline"]["metrics"]["n_examples"]),
        "finetune_wall_s": round(finetune_s, 1),
        "finetune_s_per_step": round(train_s_per_step, 3),
        "compress_wall_s": {k: round(r["wall_s"], 1) for k, r in reports.items()},
        "s_per_step": {
            k: v
            for name in reports
            for k, v in training_s_per_step(out / "compress" / name).items()
        },
        "wall_s": round(time.perf_counter() - start, 1),
        "rows": rows,
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
