"""Generation throughput: ``scilm evaluate`` (task seq2seq) on 1 and 2 MPI ranks against a
plain ``transformers`` ``generate`` loop, over the same SciTLDR test abstracts, in one run.

The model is MiniLM -> MiniLM warm-started as an encoder-decoder (``--model`` takes an
export instead). An untrained pair rarely emits EOS, so every example generates
``--max-new-tokens`` tokens: the work per example is fixed, which is what a throughput
comparison wants. Examples/s counts generation (and the teacher-forced loss pass) only,
slowest rank; each rank's inference seconds and each run's wall seconds (start-up,
loading and mpirun included) are listed too. The HF loop generates batches of the same
size (file order, greedy) without a loss pass; ``1rank_2threads_no_loss`` is scilm's
rank doing the same work (``eval.target_loss=false``).

    python benchmarks/generate.py [--samples 64] [--repeats 1] [--model DIR]
"""

from __future__ import annotations

import itertools
import json
import os
import time
from pathlib import Path

import _common as bench


def warm_started_minilm(out: Path) -> Path:
    """MiniLM -> MiniLM (seeded cross-attention) exported to ``out``."""
    import torch

    from scilm_hpc.model_source import load_tokenizer, packaged_minilm_path
    from scilm_hpc.schema import DataConfig
    from scilm_hpc.tasks.seq2seq import Seq2Seq
    from scilm_hpc.train.export import write_export

    minilm = packaged_minilm_path()
    torch.manual_seed(0)
    model = Seq2Seq(DataConfig(max_target_length=32)).load_pretrained(minilm, None, [], minilm)
    write_export(model, load_tokenizer(minilm), out)
    return out


def hf_generate_rate(model_dir: Path, texts: list[str], batch_size: int, new: int) -> float:
    """Examples/s of ``AutoModelForSeq2SeqLM.generate`` over ``texts`` in batches."""
    import torch
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSeq2SeqLM.from_pretrained(model_dir).eval()
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            inputs = tokenizer(
                texts[i : i + batch_size],
                truncation=True,
                max_length=256,
                padding=True,
                return_tensors="pt",
                return_token_type_ids=False,
            )
            model.generate(**inputs, max_new_tokens=new, num_beams=1, do_sample=False)
    return len(texts) / (time.perf_counter() - start)


def scilm_rate(run_dir: Path, overrides: list[str]) -> float:
    """Examples/s of one ``scilm evaluate`` in this process's cores (``cluster=none``)."""
    bench.run(bench.job_command("evaluate", *overrides, f"run.dir={run_dir}", "cluster=none"))
    return json.loads((run_dir / "eval.json").read_text())["examples_per_s"]


def main() -> None:
    parser = bench.command_line(
        __doc__, repeats=1, batch_size=16, max_new_tokens=32, model=(Path, None)
    )
    parser.add_argument("--samples", type=int, default=64, help="test abstracts")
    args = parser.parse_args()
    root = bench.work_dir(None, "gen")
    model = args.model or warm_started_minilm(root / "model")
    test = root / "test.jsonl"
    texts = [
        json.loads(x)["abstract"]
        for x in bench.head_lines(bench.SCITLDR / "test.jsonl", test, args.samples)
    ]
    overrides = [*bench.SCITLDR_SEQ2SEQ, f"model.name_or_path={model}"]
    shards = bench.prepare_shards(root, {"train": test, "test": test}, *overrides)
    overrides += [
        f"data.shards={shards}",
        f"eval.batch_size={args.batch_size}",
        f"eval.max_new_tokens={args.max_new_tokens}",
    ]
    no_loss = itertools.count()
    rates, walls = bench.eval_scaling(
        root,
        args.repeats,
        overrides,
        {
            "hf_generate_loop": lambda: hf_generate_rate(
                model, texts, args.batch_size, args.max_new_tokens
            ),
            "1rank_2threads_no_loss": lambda: scilm_rate(
                root / f"no-loss-{next(no_loss)}", [*overrides, "eval.target_loss=false"]
            ),
        },
    )
    last = args.repeats - 1  # each variant's inference seconds per rank, last repeat
    rank_seconds = {
        name: json.loads((root / f"{name}-{last}" / "eval.json").read_text())["rank_seconds"]
        for name in walls
    }
    figures = {
        "benchmark": "generate",
        "n_examples": len(texts),
        "repeats": args.repeats,
        "max_new_tokens": args.max_new_tokens,
        **{f"{k}_examples_per_s": round(v, 2) for k, v in rates.items()},
        **bench.rank_scaling(rates),
        "ratio_1rank_vs_hf_generate_loop": rates["1rank_2threads"] / rates["hf_generate_loop"],
        "ratio_1rank_no_loss_vs_hf_generate_loop": rates["1rank_2threads_no_loss"]
        / rates["hf_generate_loop"],
        **{f"{k}_wall_s": round(v, 1) for k, v in walls.items()},
        **{f"{k}_rank_s": v for k, v in rank_seconds.items()},
        "machine_cores": os.cpu_count(),
    }
    bench.report(figures, width=40)


if __name__ == "__main__":
    main()
