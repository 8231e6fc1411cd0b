#!/usr/bin/env bash
# The whole pipeline on real data shipped in the repository (data/antibody-vgene/:
# 817 antibody chains from SAbDab, Apache-2.0, labelled by germline V-gene family),
# the packaged MiniLM, local processes. Nothing here reads ../shared or the network.
# Starts from a clean RUN_DIR. (The generated corpus, scilm_hpc.data.demo_corpus, stays
# for the tests.)
set -euo pipefail
RUN_DIR=${RUN_DIR:-runs/demo}
DATA=${DEMO_DATA:-data/antibody-vgene}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
rm -rf "$RUN_DIR"
echo "== 1. real data: $DATA (antibody chain -> its germline V-gene family, 8 classes; see its README)"
echo "== 2. prepare: tokenize with MiniLM's tokenizer into HDF5 shards (2 local processes)"
scilm prepare jobs/prepare.yaml run.dir="$RUN_DIR" \
    data.train="$DATA/train.jsonl" data.dev="$DATA/dev.jsonl" \
    data.test="$DATA/test.jsonl" data.examples_per_shard=256 data.max_length=64 \
    cluster.tasks_per_node=2
echo "== 3. verify the shards (checksums, tokenizer fingerprint)"
scilm validate jobs/prepare.yaml run.dir="$RUN_DIR" data.train="$DATA/train.jsonl" --data
if slurm/dev-cluster up >"$RUN_DIR/dev-cluster.log" 2>&1; then
    eval "$(slurm/dev-cluster env)"
    CLUSTER=(cluster=dev cluster.nodes=2 cluster.tasks_per_node=1 --wait)
    WHERE="the development Slurm cluster (2 nodes x 1 task; scilm status $RUN_DIR)"
else
    CLUSTER=(cluster=local cluster.tasks_per_node=2)
    WHERE="2 local processes: no Slurm dev cluster here ($(tail -1 "$RUN_DIR/dev-cluster.log"))"
fi
echo "== 4. fine-tune MiniLM with DeepSpeed ZeRO-2 on CPU ranks (gloo), ${DEMO_EPOCHS:-4} epochs, on"
echo "     $WHERE"
echo "     (the first DeepSpeed run on a machine compiles a CPU op: about 30-90 s)"
scilm finetune jobs/finetune.yaml run.dir="$RUN_DIR" data.shards="$RUN_DIR/shards" \
    train.micro_batch_size=16 train.lr=3e-4 train.epochs="${DEMO_EPOCHS:-4}" \
    train.eval_every=10 train.checkpoint_every=10 train.log_every=5 "${CLUSTER[@]}"
if command -v mpirun >/dev/null; then
    EVAL=(cluster=local cluster.tasks_per_node=2 cluster.cpus_per_task=1); EWHERE="2 MPI ranks (mpirun)"
else
    EVAL=(cluster=none); EWHERE="1 process (no mpirun here: apt-get install openmpi-bin for MPI ranks)"
fi
echo "== 5. compress the export: dynamic int8 (recipe configs/compress/int8-dynamic.yaml)"
scilm compress jobs/compress.yaml run.dir="$RUN_DIR/compress" model.name_or_path="$RUN_DIR/export" \
    data.shards="$RUN_DIR/shards" cluster=none >/dev/null
cat "$RUN_DIR/compress/compress_report.md"
echo
echo "== 6. evaluate dense and compressed side by side on the test split, $EWHERE"
scilm evaluate jobs/evaluate.yaml run.dir="$RUN_DIR" model.name_or_path="$RUN_DIR/export" \
    eval.models="[$RUN_DIR/compress/compressed]" data.shards="$RUN_DIR/shards" "${EVAL[@]}" >/dev/null
cat "$RUN_DIR/eval.md"
echo
echo "demo done:"
echo "  shards + manifest   $RUN_DIR/shards/"
echo "  checkpoints         $RUN_DIR/checkpoints/ (latest: $(cat "$RUN_DIR/checkpoints/latest"))"
echo "  metrics             $RUN_DIR/metrics.jsonl"
echo "  loss curve          $RUN_DIR/plots/loss.png"
echo "  exported model      $RUN_DIR/export/  (AutoModelForSequenceClassification.from_pretrained)"
echo "  compressed (int8)   $RUN_DIR/compress/compressed/  (scilm_hpc.compress.load_compressed)"
echo "  compression report  $RUN_DIR/compress/compress_report.{json,md}, plots/compression_tradeoff.png"
echo "  evaluation          $RUN_DIR/eval.json, $RUN_DIR/eval.md, $RUN_DIR/plots/confusion_matrix.png"
python - "$RUN_DIR" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(f"{sys.argv[1]}/metrics.jsonl")]
dev = [r for r in rows if "dev_macro_f1" in r]
print("  dev macro-F1 by step: " + ", ".join(f"{r['step']}: {r['dev_macro_f1']:.3f}" for r in dev))
PY
