"""Evaluation throughput: ``scilm evaluate`` on 1 and 2 MPI ranks against transformers'
``pipeline`` over the same SciCite test sentences, in the same run.

The model is the packaged MiniLM with a 3-label head (``--model`` takes a fine-tuned
export instead; speed does not depend on the weights). Figures are medians over
``--repeats``; examples/s counts inference only (max over ranks; the job reports it),
wall includes process start-up and model loading.

    python benchmarks/evaluate.py [--repeats 3] [--model DIR] [--samples N]
    quick check: --repeats 1 --samples 200
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from _common import REPO, median, minilm_classifier, prepare_shards, run_scilm, scicite, show

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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--samples", type=int, default=0, help="test sentences (0: all)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="scilm-bench-eval-"))
    model = args.model or minilm_classifier(root / "model", LABELS)
    splits = scicite("train", "test")
    lines = splits["test"].read_text().splitlines()[: args.samples or None]
    splits["test"] = root / "test.jsonl"
    splits["test"].write_text("".join(x + "\n" for x in lines))
    shards = prepare_shards(root, splits)
    texts = [json.loads(x)["text"] for x in lines]
    common = [
        "evaluate",
        str(REPO / "jobs/evaluate.yaml"),
        f"model.name_or_path={model}",
        f"data.shards={shards}",
        f"eval.batch_size={args.batch_size}",
    ]
    variants = {
        "1rank_1thread": (["cluster=none"], {"OMP_NUM_THREADS": "1"}),
        "1rank_2threads": (["cluster=none"], {}),
        "2ranks_1thread": (["cluster.tasks_per_node=2", "cluster.cpus_per_task=1"], {}),
    }
    rates: dict[str, list[float]] = {k: [] for k in variants}
    walls: dict[str, list[float]] = {k: [] for k in variants}
    pipe: dict[str, list[float]] = {"pipeline_batch1": [], f"pipeline_batch{args.batch_size}": []}
    for r in range(args.repeats):
        for name, (cluster, env) in variants.items():
            run_dir = root / f"{name}-{r}"
            walls[name].append(run_scilm(*common, f"run.dir={run_dir}", *cluster, env=env))
            rates[name].append(json.loads((run_dir / "eval.json").read_text())["examples_per_s"])
        pipe["pipeline_batch1"].append(pipeline_rate(model, texts, 1))
        pipe[f"pipeline_batch{args.batch_size}"].append(
            pipeline_rate(model, texts, args.batch_size)
        )
        print(
            f"repeat {r}: " + ", ".join(f"{k} {v[-1]:.0f}/s" for k, v in {**rates, **pipe}.items()),
            flush=True,
        )
    med = {k: median(v) for k, v in {**rates, **pipe}.items()}
    figures = {
        "benchmark": "evaluate",
        "n_examples": len(texts),
        "repeats": args.repeats,
        **{f"{k}_examples_per_s": round(v, 1) for k, v in med.items()},
        **{f"{k}_wall_s": round(median(v), 2) for k, v in walls.items()},
        "scaling_2ranks_vs_1rank_1thread": med["2ranks_1thread"] / med["1rank_1thread"],
        "scaling_2ranks_vs_1rank_2threads": med["2ranks_1thread"] / med["1rank_2threads"],
        "ratio_1rank_vs_pipeline_batch1": med["1rank_2threads"] / med["pipeline_batch1"],
        "ratio_1rank_vs_pipeline_batched": med["1rank_2threads"]
        / med[f"pipeline_batch{args.batch_size}"],
        "machine_cores": os.cpu_count(),
    }
    show(figures, width=40)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
