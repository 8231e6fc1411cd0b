"""A small synthetic citation-intent corpus for the demo (no external data needed).

Sentences are assembled from templates per intent (``background``, ``method``,
``result``) with shuffled scientific fillers, so the labels are learnable but
not trivially keyed on one word. Deterministic for a given seed.

    python -m scilm_hpc.data.demo_corpus OUT_DIR [--train 600 --dev 120 --test 120]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

TOPICS = [
    "protein folding",
    "gene expression",
    "graph neural networks",
    "dark matter halos",
    "soil microbiomes",
    "tumour suppressor genes",
    "transformer language models",
    "coral bleaching",
    "battery cathodes",
    "sepsis outcomes",
    "quantum error correction",
    "malaria transmission",
    "galaxy mergers",
    "drug repurposing",
    "ice sheet dynamics",
]
AUTHORS = [
    "Smith et al.",
    "Chen and Lee",
    "Garcia et al.",
    "Okafor et al.",
    "Müller",
    "Tanaka et al.",
    "Ivanova and Park",
    "Dubois et al.",
]
TEMPLATES = {
    "background": [
        "{topic} has been studied extensively in recent years ({author}, {year}).",
        "Previous work has highlighted the importance of {topic} for {topic2} ({author}, {year}).",
        "It is widely known that {topic} plays a central role in {topic2} [{n}].",
        "Several reviews summarise the current understanding of {topic} ({author}, {year}).",
        "Interest in {topic} has grown since early reports [{n}].",
    ],
    "method": [
        "We followed the protocol of {author} ({year}) to measure {topic}.",
        "Samples were processed using the pipeline described in [{n}].",
        "Following {author} ({year}), we estimated {topic} with a mixed-effects model.",
        "The {topic} data were normalised as previously described [{n}].",
        "We adopted the sampling procedure of {author} for {topic} ({year}).",
    ],
    "result": [
        "Our estimates of {topic} agree with those reported by {author} ({year}).",
        "Consistent with [{n}], we observed a strong association between {topic} and {topic2}.",
        "In contrast to {author} ({year}), we found no effect of {topic} on {topic2}.",
        "These findings on {topic} confirm earlier observations [{n}].",
        "Similar improvements in {topic} were reported by {author} ({year}).",
    ],
}


def make_examples(count: int, rng: random.Random) -> list[dict[str, str]]:
    """``count`` examples with labels balanced across the three intents."""
    labels = sorted(TEMPLATES)
    rows = []
    for i in range(count):
        label = labels[i % len(labels)]
        topic, topic2 = rng.sample(TOPICS, 2)
        text = rng.choice(TEMPLATES[label]).format(
            topic=topic,
            topic2=topic2,
            author=rng.choice(AUTHORS),
            year=rng.randint(1985, 2025),
            n=rng.randint(1, 60),
        )
        rows.append({"text": text[0].upper() + text[1:], "label": label})
    rng.shuffle(rows)
    return rows


def write_demo_corpus(
    out_dir: str | Path, train: int = 600, dev: int = 120, test: int = 120, seed: int = 0
) -> dict[str, Path]:
    """Write ``train.jsonl``, ``dev.jsonl`` and ``test.jsonl`` under ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    paths = {}
    for split, count in (("train", train), ("dev", dev), ("test", test)):
        path = out / f"{split}.jsonl"
        with path.open("w", encoding="utf-8") as fh:
            for row in make_examples(count, rng):
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        paths[split] = path
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--train", type=int, default=600)
    parser.add_argument("--dev", type=int, default=120)
    parser.add_argument("--test", type=int, default=120)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for split, path in write_demo_corpus(
        args.out_dir, args.train, args.dev, args.test, args.seed
    ).items():
        print(f"{split}: {path}")


if __name__ == "__main__":
    main()
