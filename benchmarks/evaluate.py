"""Evaluation throughput: ``scilm evaluate`` on 1 and 2 MPI ranks against transformers'
``pipeline`` over the same SciCite test sentences, in the same run.

The model: the packaged MiniLM with a 3-label head (or ``--model``: speed does not depend
on the weights). Medians over ``--repeats``; examples/s counts inference only (slowest
rank, the job's figure), wall includes process start-up and model loading.

    python benchmarks/evaluate.py [--repeats 3] [--model DIR] [--samples N]
    quick check: --repeats 1 --samples 200
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import _common as bench

LABELS = ["background", "method", "result"]


def pipeline_rate(model: Path, texts: list[str], batch_size: int) -> float:
    """Examples/s of ``pipeline('text-classification')`` over ``texts`` (truncation to 128)."""
    from transformers import pipeline

    classify = pipeline("text-classification", model=str(model), device="cpu")
    start = time.perf_counter()
    out = classify(texts, batch_size=batch_size, truncation=True, max_length=128)
    assert len(out) == len(texts)
    return len(texts) / (time.perf_counter() - start)


def main() -> None:
    parser = bench.command_line(__doc__, repeats=3, model=(Path, None), batch_size=64)
    parser.add_argument("--samples", type=int, default=0, help="test sentences (0: all)")
    args = parser.parse_args()
    root = bench.work_dir(None, "eval")
    model = args.model or bench.minilm_classifier(root / "model", LABELS)
    test = root / "test.jsonl"
    lines = bench.head_lines(bench.SCICITE / "test.jsonl", test, args.samples)
    texts = [json.loads(x)["text"] for x in lines]
    shards = bench.prepare_shards(root, {"train": bench.SCICITE / "train.jsonl", "test": test})
    batched = f"pipeline_batch{args.batch_size}"
    overrides = [f"model.name_or_path={model}", f"data.shards={shards}"]
    references = {
        "pipeline_batch1": lambda: pipeline_rate(model, texts, 1),
        batched: lambda: pipeline_rate(model, texts, args.batch_size),
    }
    batch = f"eval.batch_size={args.batch_size}"
    rates, walls = bench.eval_scaling(root, args.repeats, [*overrides, batch], references)
    figures = {
        "benchmark": "evaluate",
        "n_examples": len(texts),
        "repeats": args.repeats,
        **{f"{k}_examples_per_s": round(v, 1) for k, v in rates.items()},
        **{f"{k}_wall_s": round(v, 2) for k, v in walls.items()},
        **bench.rank_scaling(rates),
        "ratio_1rank_vs_pipeline_batch1": rates["1rank_2threads"] / rates["pipeline_batch1"],
        "ratio_1rank_vs_pipeline_batched": rates["1rank_2threads"] / rates[batched],
        "machine_cores": os.cpu_count(),
    }
    bench.report(figures, width=40)


if __name__ == "__main__":
    main()
