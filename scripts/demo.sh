#!/usr/bin/env bash
# The whole pipeline on embedded defaults: a generated corpus, the packaged MiniLM, local
# processes. Nothing here reads ../shared or the network.
set -euo pipefail
RUN_DIR=${RUN_DIR:-runs/demo}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
echo "== 1. a small synthetic citation-intent corpus -> $RUN_DIR/corpus"
python -m scilm_hpc.data.demo_corpus "$RUN_DIR/corpus"
echo "== 2. prepare: tokenize with MiniLM's tokenizer into HDF5 shards (2 local processes)"
scilm prepare jobs/prepare.yaml run.dir="$RUN_DIR" \
    data.train="$RUN_DIR/corpus/train.jsonl" data.dev="$RUN_DIR/corpus/dev.jsonl" \
    data.test="$RUN_DIR/corpus/test.jsonl" data.examples_per_shard=256 \
    cluster.tasks_per_node=2 data.overwrite=true
echo "== 3. verify the shards (checksums, tokenizer fingerprint)"
scilm validate jobs/prepare.yaml run.dir="$RUN_DIR" data.train="$RUN_DIR/corpus/train.jsonl" --data
echo "demo done: shards and manifest in $RUN_DIR/shards"
