"""Generation throughput: ``scilm evaluate`` (task seq2seq) on 1 and 2 MPI ranks against a
plain ``transformers`` ``generate`` loop, over the same SciTLDR test abstracts, in one run.

The model is MiniLM -> MiniLM warm-started as an encoder-decoder (``--model`` takes an
export instead). An untrained pair rarely emits EOS, so every example generates
``--max-new-tokens`` tokens: the work per example is fixed, which is what a throughput
comparison wants. Examples/s counts generation (and the teacher-forced loss pass) only,
max over ranks; the HF loop generates the same batches (file order, greedy) without a
loss pass.

    python benchmarks/generate.py [--samples 64] [--repeats 1] [--model DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from _common import DATA, REPO, median, prepare_shards, run_scilm, show

SCITLDR = DATA / "scitldr"
SEQ2SEQ = [
    "task=seq2seq",
    "data.text_field=abstract",
    "data.target_field=tldr",
    "data.references_field=tldrs",
    "data.max_length=256",
    "data.max_target_length=32",
]


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=64, help="test abstracts")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--model", type=Path, default=None)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="scilm-bench-gen-"))
    model = args.model or warm_started_minilm(root / "model")
    lines = (SCITLDR / "test.jsonl").read_text().splitlines()[: args.samples]
    test = root / "test.jsonl"
    test.write_text("".join(x + "\n" for x in lines))
    shards = prepare_shards(
        root,
        {"train": test, "test": test},
        *SEQ2SEQ,
        f"model.name_or_path={model}",
    )
    common = [
        "evaluate",
        str(REPO / "jobs/evaluate.yaml"),
        *SEQ2SEQ,
        f"model.name_or_path={model}",
        f"data.shards={shards}",
        f"eval.batch_size={args.batch_size}",
        f"eval.max_new_tokens={args.max_new_tokens}",
    ]
    variants = {
        "1rank_1thread": (["cluster=none"], {"OMP_NUM_THREADS": "1"}),
        "1rank_2threads": (["cluster=none"], {}),
        "2ranks_1thread": (["cluster.tasks_per_node=2", "cluster.cpus_per_task=1"], {}),
    }
    rates: dict[str, list[float]] = {k: [] for k in [*variants, "hf_generate_loop"]}
    texts = [json.loads(x)["abstract"] for x in lines]
    for r in range(args.repeats):
        for name, (cluster, env) in variants.items():
            run_dir = root / f"{name}-{r}"
            run_scilm(*common, f"run.dir={run_dir}", *cluster, env=env)
            rates[name].append(json.loads((run_dir / "eval.json").read_text())["examples_per_s"])
        rates["hf_generate_loop"].append(
            hf_generate_rate(model, texts, args.batch_size, args.max_new_tokens)
        )
        print(f"repeat {r}: " + ", ".join(f"{k} {v[-1]:.2f}/s" for k, v in rates.items()))
    med = {k: median(v) for k, v in rates.items()}
    figures = {
        "benchmark": "generate",
        "n_examples": len(texts),
        "repeats": args.repeats,
        "max_new_tokens": args.max_new_tokens,
        **{f"{k}_examples_per_s": round(v, 2) for k, v in med.items()},
        "scaling_2ranks_vs_1rank_1thread": med["2ranks_1thread"] / med["1rank_1thread"],
        "scaling_2ranks_vs_1rank_2threads": med["2ranks_1thread"] / med["1rank_2threads"],
        "ratio_1rank_vs_hf_generate_loop": med["1rank_2threads"] / med["hf_generate_loop"],
        "machine_cores": os.cpu_count(),
    }
    show(figures, width=40)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
