"""Evaluation throughput: ``scilm evaluate`` on 1 and 2 MPI ranks against transformers'
``pipeline`` over the same SciCite test sentences, in the same run.

The model is the packaged MiniLM with a 3-label head (``--model`` takes a fine-tuned
export instead; speed does not depend on the weights). Figures are medians over
``--repeats``; examples/s counts inference only (max over ranks; the job reports it),
wall includes process start-up and model loading.

    python benchmarks/evaluate.py [--repeats 3] [--model DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "scicite"
SCILM = str(Path(sys.executable).with_name("scilm"))
LABELS = ["background", "method", "result"]


def scilm(*args: str, env: dict[str, str] | None = None) -> float:
    start = time.perf_counter()
    done = subprocess.run(
        [SCILM, *args], capture_output=True, text=True, env={**os.environ, **(env or {})}
    )
    if done.returncode != 0:
        sys.exit(f"scilm {args[0]} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def make_model(out: Path) -> Path:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from scilm_hpc.model_source import packaged_minilm_path

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(
        packaged_minilm_path(),
        num_labels=3,
        id2label=dict(enumerate(LABELS)),
        label2id={n: i for i, n in enumerate(LABELS)},
    )
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(packaged_minilm_path()).save_pretrained(out)
    return out


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
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    root = Path(tempfile.mkdtemp(prefix="scilm-bench-eval-"))
    model = args.model or make_model(root / "model")
    scilm(
        "prepare",
        str(REPO / "jobs/prepare.yaml"),
        "cluster=none",
        f"run.dir={root}",
        f"data.train={DATA / 'train.jsonl'}",
        f"data.test={DATA / 'test.jsonl'}",
    )
    texts = [json.loads(x)["text"] for x in (DATA / "test.jsonl").read_text().splitlines()]
    common = [
        "evaluate",
        str(REPO / "jobs/evaluate.yaml"),
        f"model.name_or_path={model}",
        f"data.shards={root / 'shards'}",
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
            walls[name].append(scilm(*common, f"run.dir={run_dir}", *cluster, env=env))
            rates[name].append(json.loads((run_dir / "eval.json").read_text())["examples_per_s"])
        pipe["pipeline_batch1"].append(pipeline_rate(model, texts, 1))
        pipe[f"pipeline_batch{args.batch_size}"].append(
            pipeline_rate(model, texts, args.batch_size)
        )
        print(
            f"repeat {r}: " + ", ".join(f"{k} {v[-1]:.0f}/s" for k, v in {**rates, **pipe}.items()),
            flush=True,
        )
    med = {k: statistics.median(v) for k, v in {**rates, **pipe}.items()}
    figures = {
        "benchmark": "evaluate",
        "n_examples": len(texts),
        "repeats": args.repeats,
        **{f"{k}_examples_per_s": round(v, 1) for k, v in med.items()},
        **{f"{k}_wall_s": round(statistics.median(v), 2) for k, v in walls.items()},
        "scaling_2ranks_vs_1rank_1thread": med["2ranks_1thread"] / med["1rank_1thread"],
        "scaling_2ranks_vs_1rank_2threads": med["2ranks_1thread"] / med["1rank_2threads"],
        "ratio_1rank_vs_pipeline_batch1": med["1rank_2threads"] / med["pipeline_batch1"],
        "ratio_1rank_vs_pipeline_batched": med["1rank_2threads"]
        / med[f"pipeline_batch{args.batch_size}"],
        "machine_cores": os.cpu_count(),
    }
    for key, value in figures.items():
        print(f"{key:>40}: {value:.2f}" if isinstance(value, float) else f"{key:>40}: {value}")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
