"""CPU latency of the quantisation paths on short texts: fp32, torch.ao int8, torchao.

The packaged MiniLM with a 3-class head (random head: latency does not depend on the
weights' values), SciCite test sentences cut to ``--tokens`` tokens, batches of 1 and
16, on ``--threads`` threads. Every variant is measured in the same process, rounds
interleaved (variant A, B, C, A, B, C, ...) so a load change on a shared machine hits
them alike; each figure is the median over rounds of ``compress.measure.latency_ms``
(wall time), and beside it the median process CPU time of one forward pass (all
threads together), which a busy shared machine disturbs much less than wall time.

Variants: ``fp32`` (dense), ``ao-int8-dynamic`` (scilm's dynamic int8 on torch's
quantized CPU kernels, fbgemm / oneDNN), ``torchao-int8-dynamic``
(``Int8DynamicActivationInt8WeightConfig``), ``torchao-int8-weight``
(``Int8WeightOnlyConfig``), ``torchao-int4-weight`` (``Int4WeightOnlyConfig``,
group 64, if it runs on this CPU), ``scilm-int8-weight`` / ``scilm-int4-weight``
(scilm's own weight-only layers); ``ao-int8-dynamic-onednn`` (the native path with its
weights packed under torch's ``onednn`` quantized engine instead of the default ``x86``),
``torchao-int8-dynamic-compiled`` and ``fp32-compiled`` (``torch.compile``; the first
call of each new shape compiles, outside the timed rounds); ``pt2e-int8-static`` (the
``int8-static`` recipe: torchao's PT2E static int8, calibrated on 256 other test
sentences, compiled by inductor with dynamic shapes on first call). The prunable linear layers
are quantised in every case (``compress.targets.prunable_linears``), as the compress job
does.

    python benchmarks/quantize_latency.py [--threads 2] [--tokens 17] [--rounds 7]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from typing import Any

import _common as bench


def texts(count: int) -> list[str]:
    path = bench.SCICITE / "test.jsonl"
    if path.is_file():
        rows = [json.loads(line)["text"] for line in path.open(encoding="utf-8")]
        return rows[:count]
    return [
        f"Protein structure prediction with language models, study number {i}" for i in range(count)
    ]


def variants() -> dict[str, Any]:
    """name -> function(model) quantising the model in place (or None if unavailable)."""
    from scilm_hpc.compress.quantize import quantize_model
    from scilm_hpc.compress.targets import prunable_linears

    def ours(method: str, bits: int, group: int | None) -> Any:
        return lambda m: quantize_model(m, prunable_linears(m), method, bits, group, False)

    def torchao(method: str, bits: int, group: int | None) -> Any:
        return lambda m: quantize_model(
            m, prunable_linears(m), method, bits, group, False, backend="torchao"
        )

    def under_engine(engine: str, make: Any) -> Any:
        """``make`` with weights packed for another quantized engine (the packed layout
        then chooses the kernels; the global setting is restored)."""

        def run(model: Any) -> None:
            import torch

            before = torch.backends.quantized.engine
            torch.backends.quantized.engine = engine
            try:
                make(model)
            finally:
                torch.backends.quantized.engine = before

        return run

    def compiled(make: Any) -> Any:
        def run(model: Any) -> Any:
            import torch

            make(model)
            return torch.compile(model)

        return run

    def static(model: Any) -> Any:
        from transformers import AutoTokenizer

        from scilm_hpc.compress.static_quant import static_int8
        from scilm_hpc.model_source import packaged_minilm_path

        tokenizer = AutoTokenizer.from_pretrained(packaged_minilm_path())
        rows = texts(456)[200:]  # calibration: sentences the timed batches do not use
        batches = [
            dict(tokenizer(rows[i : i + 32], truncation=True, padding=True, return_tensors="pt"))
            for i in range(0, len(rows), 32)
        ]
        batches = [{k: b[k] for k in ("input_ids", "attention_mask")} for b in batches]
        return static_int8(model, prunable_linears(model), batches)

    return {
        "fp32": lambda m: None,
        "pt2e-int8-static": static,
        "ao-int8-dynamic": ours("dynamic", 8, None),
        "ao-int8-dynamic-onednn": under_engine("onednn", ours("dynamic", 8, None)),
        "torchao-int8-dynamic-compiled": compiled(torchao("dynamic", 8, None)),
        "fp32-compiled": compiled(lambda m: None),
        "torchao-int8-dynamic": torchao("dynamic", 8, None),
        "torchao-int8-weight": torchao("weight_only", 8, None),
        "torchao-int4-weight": torchao("weight_only", 4, 64),
        "scilm-int8-weight": ours("weight_only", 8, None),
        "scilm-int4-weight": ours("weight_only", 4, 64),
    }


def cpu_ms(model: Any, batch: dict[str, Any], repeats: int, threads: int) -> float:
    """Median process CPU milliseconds of one forward pass on ``threads`` threads."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    times = []
    with torch.no_grad():
        model(**batch)
        for _ in range(repeats):
            start = time.process_time()
            model(**batch)
            times.append(1000.0 * (time.process_time() - start))
    torch.set_num_threads(before)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=17)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--only", nargs="*", default=None, help="variant names to measure")
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from scilm_hpc.compress.measure import latency_ms
    from scilm_hpc.model_source import packaged_minilm_path

    torch.manual_seed(0)
    path = packaged_minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    dense = AutoModelForSequenceClassification.from_pretrained(path, num_labels=3).eval()
    models: dict[str, Any] = {}
    for name, make in variants().items():
        if args.only and name not in args.only:
            continue
        model = copy.deepcopy(dense)
        try:
            wrapped = make(model)  # compiled and static variants return a new module
            model = wrapped if isinstance(wrapped, torch.nn.Module) else model
            with torch.no_grad():
                model(**tokenizer(["warm up"], return_tensors="pt"))
        except Exception as error:  # a recipe this CPU / build cannot run: say so, go on
            print(f"{name}: not measured ({type(error).__name__}: {error})", file=sys.stderr)
            continue
        models[name] = model.eval()
    sentences = texts(max(args.batches))
    table: dict[int, dict[str, float]] = {}
    cpu_table: dict[int, dict[str, float]] = {}
    for size in args.batches:
        batch = tokenizer(
            sentences[:size],
            truncation=True,
            max_length=args.tokens,
            padding=True,
            return_tensors="pt",
        )
        batch = {k: batch[k] for k in ("input_ids", "attention_mask")}
        times: dict[str, list[float]] = {name: [] for name in models}
        cpu: dict[str, list[float]] = {name: [] for name in models}
        with torch.no_grad():  # a compiled variant compiles each new shape once
            for model in models.values():
                model(**batch)
        for _ in range(args.rounds):
            for name, model in models.items():
                times[name].append(latency_ms(model, batch, args.repeats, args.threads))
                cpu[name].append(cpu_ms(model, batch, args.repeats, args.threads))
        table[size] = {name: statistics.median(v) for name, v in times.items()}
        cpu_table[size] = {name: statistics.median(v) for name, v in cpu.items()}
        shape = tuple(batch["input_ids"].shape)
        print(f"\nbatch {size} (input {shape}), {args.threads} threads, medians:")
        print(f"  {'variant':22s} {'wall ms':>9s} {'x fp32':>7s} {'CPU ms':>9s} {'x fp32':>7s}")
        for name, ms in table[size].items():
            wall_x = table[size]["fp32"] / ms if "fp32" in table[size] else float("nan")
            cpu_x = cpu_table[size]["fp32"] / cpu_table[size][name] if "fp32" in cpu else 0.0
            print(
                f"  {name:22s} {ms:9.2f} {wall_x:7.2f} {cpu_table[size][name]:9.2f} {cpu_x:7.2f}",
                flush=True,
            )
    print(
        json.dumps(
            {"threads": args.threads, "tokens": args.tokens, "wall_ms": table, "cpu_ms": cpu_table}
        )
    )


if __name__ == "__main__":
    main()
