"""The structured config schema: one dataclass per section of a job file.

Every key a job file or an override may set is declared here, with its type
and default; ``config.load_config`` merges YAML and ``key=value`` overrides
onto these dataclasses so that a typo at any depth fails with its full key.
Allowed value sets live beside the fields they constrain and are checked by
``config.validate``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

JOB_KINDS = ("prepare", "finetune", "compress", "evaluate")
TASKS = ("classification", "token_classification", "causal_lm", "regression", "seq2seq")
DATA_FORMATS = ("jsonl", "csv", "conll", "fasta", "text", "parquet")
UNKNOWN_RESIDUE_POLICIES = ("refuse", "map_x", "skip")
SHARD_COMPRESSIONS = ("none", "gzip", "lzf")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
ADAMW_KERNELS = ("auto", "fused", "foreach")
SCHEDULES = ("linear", "cosine", "constant")
CLUSTER_BACKENDS = ("none", "local", "slurm")
SPLITS = ("train", "dev", "test")

#: Config groups: a top-level section that ``NAME=choice`` on the command line
#: (or an entry ``NAME/choice`` in a job's ``defaults``) fills from ``configs/NAME/``.
GROUPS = ("model", "data", "train", "zero", "cluster", "compress")


@dataclass
class RunConfig:
    """Where a run lives. ``dir`` holds config.yaml, logs, checkpoints, reports."""

    dir: str = MISSING
    name: str = "scilm"
    # a rerun on a used dir whose config differs in more than cluster / logging keys is
    # refused with the differences unless this is true (docs/run-directory.md)
    allow_config_change: bool = False


@dataclass
class SplitConfig:
    """Deterministic ratio split of ``data.train`` when no dev/test file is given."""

    dev_ratio: float = 0.0
    test_ratio: float = 0.0
    seed: int = 0


@dataclass
class DataConfig:
    """Raw corpus, how to read it, and the HDF5 shards prepare writes."""

    # jsonl | csv | conll | fasta | text | parquet (columns named by the *_field keys)
    format: str = "jsonl"
    # a file, a directory (its files, sorted) or a glob pattern; ``.gz`` files are gunzipped
    train: str | None = None
    dev: str | None = None
    test: str | None = None
    text_field: str = "text"
    label_field: str = "label"
    # CoNLL: column index of the token and of the tag (negative counts from the end).
    token_column: int = 0
    tag_column: int = -1
    csv_delimiter: str = ","
    # Protein sequences (see docs/protein.md): set for a protein corpus, "" (ESM: residues
    # side by side) or " " (AntiBERTy, ProtBert: one residue a word); None: natural text.
    # FASTA input is always protein ("" unless set).
    residue_separator: str | None = None
    # A residue the tokenizer does not know: refuse (error naming record and character),
    # map_x (replace with X), skip (drop it, with its tag); counted in the manifest.
    unknown_residue: str = "refuse"
    # FASTA: labels from this CSV (columns ``id``, the record id, and data.label_field)
    # instead of the headers' key=value fields
    fasta_labels: str | None = None
    shards: str = "${run.dir}/shards"
    max_length: int = 128
    examples_per_shard: int = 4096
    compression: str = "gzip"
    compression_level: int = 4
    tokenize_batch_size: int = 512
    # causal LM: join documents with EOS and cut them into max_length blocks (nothing
    # discarded, attention kept within each document); false: one document per row, cut
    # at max_length (the cut tokens are counted in the manifest)
    packing: bool = True
    overwrite: bool = False
    # seq2seq: the target text, an optional list of references (multi-reference
    # evaluation; default: the target alone), the target's token limit, and the prompt
    # a decoder-only model reads (its ``{source}`` is the source text; the target follows)
    target_field: str = "target"
    references_field: str | None = None
    max_target_length: int = 64
    prompt_template: str = "{source}\nTL;DR:"
    split: SplitConfig = field(default_factory=SplitConfig)


@dataclass
class LoraConfig:
    """LoRA adapters through peft: ``r`` 0 (or null) trains every parameter instead.

    Only the adapters (and a new task head) train; ``target_modules`` null takes peft's
    default for the model family (e.g. q_proj, v_proj for Llama; query, value for BERT).
    """

    r: int | None = 0
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] | None = None


@dataclass
class ModelConfig:
    """The pretrained model: a local HF directory, a hub id, or ``minilm``."""

    name_or_path: str = "minilm"
    revision: str | None = None
    lora: LoraConfig = field(default_factory=LoraConfig)
    # seq2seq: warm-start an encoder-decoder (name_or_path the encoder, this the decoder)
    decoder_name_or_path: str | None = None


@dataclass
class TrainConfig:
    """Optimisation and checkpointing for finetune (and compression recovery)."""

    epochs: int = 1
    max_steps: int = -1
    micro_batch_size: int = 16
    gradient_accumulation: int = 1
    global_batch_size: int | None = None
    lr: float = 5e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.0
    schedule: str = "linear"
    clip_grad: float = 1.0
    # AdamW kernel on CPU ranks: auto = torch's fused kernel (one pass over each tensor, the
    # fastest on every CPU measured; docs/decisions.md "Training speed against the HF
    # Trainer"), foreach = the multi-tensor loop (bit-identical to the per-tensor loop, the
    # default before); GPUs use DeepSpeed's fused Adam, CPU offload DeepSpeed's CPU Adam
    adamw: str = "auto"
    # auto: bf16 where the hardware multiplies it natively (a CUDA GPU with bf16, a CPU with
    # AVX-512 BF16 or AMX), else fp32; resolved on each rank (runtime.hardware)
    precision: str = "auto"
    seed: int = 42
    log_every: int = 10
    # TensorBoard event files under RUN_DIR/tensorboard/ (rank 0) mirroring metrics.jsonl;
    # None (auto): on where the ``tensorboard`` package is installed
    tensorboard: bool | None = None
    eval_every: int = 0
    checkpoint_every: int = 0
    keep_last: int = 2
    length_bucketing: bool = True
    # recompute activations in the backward pass (less memory, about a third more compute)
    gradient_checkpointing: bool = False
    # torch.compile the model's forward (inductor; dynamic shapes, dropout from torch's own
    # generator so results and resume match eager): worth it only when the run is long
    # enough to repay the compile (about a minute for MiniLM on 2 CPU cores)
    compile: bool = False
    # peak TFLOP/s of one rank's device (e.g. 989 for an H100 SXM in bf16): metrics.jsonl
    # then has mfu (model FLOPs per second / peak x ranks); None: no mfu column
    peak_tflops: float | None = None
    # e.g. dev_loss or dev_macro_f1: keeps the best checkpoint (needs eval_every > 0)
    best_metric: str | None = None
    early_stopping_patience: int = 0
    # the training loss: auto (the model's own: cross-entropy, MSE for regression) or
    # huber (regression, quadratic within huber_delta standardised units, then linear)
    loss: str = "auto"
    huber_delta: float = 1.0
    # classification / token_classification: weight of each class (label name -> weight,
    # others 1.0) in the cross-entropy, e.g. {P: 9.0} for 10% positive residues
    class_weights: dict[str, float] = field(default_factory=dict)
    # a rank whose step has not advanced this long dumps its stacks and ends the job
    # (runtime.watchdog); 0 (auto): 20 x the median step time after warm-up, at least 120 s
    hang_timeout_s: float = 0.0
    # warn (and record a `straggler` event) when one rank's work before the step's first
    # collective is persistently slower than the ranks' median by this factor (median
    # over 20 steps; train.stragglers); 0 turns the check off
    straggler_factor: float = 1.5
    # seq2seq: generate at each dev evaluation and log dev ROUGE (dev_rouge1/2/L/Lsum,
    # dev_gen_length) whatever best_metric selects by; None (auto): when best_metric is a
    # ROUGE metric (dev_rougeL, ...); false: never (a ROUGE best_metric then is an error)
    dev_generate: bool | None = None
    # dev examples generated at each dev evaluation (the first N; 0 = all), with the eval
    # section's generation options
    dev_generate_examples: int = 64


@dataclass
class ZeroConfig:
    """DeepSpeed ZeRO: stage 0-3, CPU offload, an optional user JSON merged in."""

    # None (auto): resolved when the config is (``stage_for``): 0 on one rank, else 2
    stage: int | None = None
    offload_optimizer: bool = False
    offload_params: bool = False
    config_file: str | None = None

    def stage_for(self, world_size: int) -> int:
        """The stage in effect on ``world_size`` ranks: the one asked for, else (auto)
        3 with parameter offload, 2 with optimizer offload or several ranks, and 0 on one
        rank, where partitioning saves nothing and costs time (docs/decisions.md)."""
        if self.stage is not None:
            return self.stage
        if self.offload_params:
            return 3
        return 2 if self.offload_optimizer or world_size > 1 else 0


@dataclass
class ClusterConfig:
    """Where the job runs: in this process, local subprocesses, or Slurm."""

    backend: str = "local"
    nodes: int = 1
    tasks_per_node: int = 1
    gpus_per_node: int = 0
    # None (auto): Slurm allocates 1; local ranks share this machine's physical cores
    # (runtime.hardware.cpu_threads)
    cpus_per_task: int | None = None
    mem_gb: float | None = None
    time_min: int = 60
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    extra_sbatch: list[str] = field(default_factory=list)
    setup: list[str] = field(default_factory=list)
    # Slurm client config to use (the dev cluster's); None: Slurm's default lookup.
    slurm_conf: str | None = None
    # USR2 this many seconds before the time limit: checkpoint and requeue.
    signal_delay_s: int = 120
    max_requeues: int = 3
    # how long a collective (all-reduce, barrier, a file rendezvous) may wait for the
    # other ranks before it fails instead of hanging
    collective_timeout_s: int = 600

    def world_size(self) -> int:
        """Ranks this section asks for (one in this process with ``backend=none``)."""
        return 1 if self.backend == "none" else self.nodes * self.tasks_per_node


#: ``train.loss`` values
TRAIN_LOSSES = ("auto", "huber")

#: Compression step kinds and the values their fields allow (checked by config.validate).
COMPRESS_KINDS = ("distill", "prune", "recover", "quantize")
PRUNE_METHODS = ("magnitude", "wanda")
PRUNE_PATTERNS = ("unstructured", "nm", "ffn", "heads")
PRUNE_SCOPES = ("layer", "global")
PRUNE_SCHEDULES = ("oneshot", "gradual")
QUANT_METHODS = ("dynamic", "weight_only", "static")
QUANT_BACKENDS = ("native", "torchao")


@dataclass
class StudentSpec:
    """The student of a ``distill`` step: the teacher's architecture made smaller, or a
    model directory of its own (``name_or_path``, same tokenizer and labels).

    ``num_hidden_layers`` (None: half the teacher's, rounded up) layers initialised
    from the teacher's layers ``layers`` (default: evenly spread, first and last
    kept); ``hidden_size`` / ``intermediate_size`` / ``num_attention_heads`` (None:
    the teacher's) narrow it, its tensors then starting as the leading slices of the
    teacher's.
    """

    name_or_path: str | None = None
    num_hidden_layers: int | None = None
    layers: list[int] = field(default_factory=list)
    hidden_size: int | None = None
    intermediate_size: int | None = None
    num_attention_heads: int | None = None


@dataclass
class CompressStep:
    """One step of a compression recipe.

    ``prune``: ``method`` magnitude|wanda, ``pattern`` unstructured (``sparsity``,
    ``scope`` layer|global) | nm (``n`` of every ``m`` kept) | ffn (``sparsity`` of
    each layer's FFN neurons removed) | heads (``sparsity`` of each layer's attention
    heads removed); ``schedule`` oneshot, or gradual (magnitude, unstructured: the
    sparsity is reached during the next ``recover`` step). Wanda and activation-aware
    structured scores use ``calibration_batches`` batches of the train split.
    ``recover``: ``steps`` optimizer steps of distillation from the dense model
    (``alpha`` x KD loss at ``temperature`` + (1 - alpha) x task loss) with the
    ``train`` section's optimiser, masks fixed. ``quantize``: ``method`` dynamic
    (int8 activations and weights, CPU) | weight_only (``bits`` 8|4, per output
    channel or per ``group_size`` inputs) | static (int8 weights and activations, the
    activation ranges fixed on ``calibration_batches`` train batches; torchao's PT2E
    flow, compiled by inductor on first use; backend torchao, scoring tasks only);
    ``embeddings`` also quantises the word
    embeddings (weight-only, per row); ``backend`` native (torch's quantized CPU
    kernels for dynamic, scilm's packed layers for weight-only) | torchao (torchao's
    ``quantize_``; see docs/decisions.md for which is faster). ``distill`` (the first
    step): ``steps`` optimizer steps training a smaller ``student`` from the dense model,
    loss as for ``recover`` plus ``hidden_mse`` x the mean squared error between each
    student layer's hidden states and those of the teacher layer it started from (0: off;
    students as wide as the teacher only).
    """

    kind: str = MISSING
    name: str | None = None
    method: str | None = None
    pattern: str = "unstructured"
    sparsity: float | None = None
    scope: str = "layer"
    schedule: str = "oneshot"
    n: int | None = None
    m: int | None = None
    calibration_batches: int = 8
    steps: int | None = None
    alpha: float = 0.5
    temperature: float = 2.0
    hidden_mse: float = 0.0
    bits: int | None = None
    group_size: int | None = None
    embeddings: bool = False
    backend: str = "native"
    student: StudentSpec = field(default_factory=StudentSpec)


@dataclass
class CompressConfig:
    """A compression recipe (``configs/compress/NAME.yaml``) and how it is measured.

    The report measures every step on ``eval_split`` of ``data.shards`` (at most
    ``eval_examples`` examples; 0 = all) and its CPU latency as the median of
    ``latency_repeats`` forward passes of one fixed batch of ``latency_batch``
    examples, on ``latency_threads`` threads (0 = torch's default).
    """

    name: str = "none"
    steps: list[CompressStep] = field(default_factory=list)
    eval_split: str = "dev"
    eval_examples: int = 0
    latency_batch: int = 32
    latency_repeats: int = 20
    latency_threads: int = 0


@dataclass
class EvalConfig:
    """Which split to evaluate, batch size, and whether to keep predictions."""

    split: str = "test"
    batch_size: int = 64
    predictions: bool = False
    # more models evaluated in the same job, side by side with model.name_or_path
    models: list[str] = field(default_factory=list)
    # seq2seq generation: greedy (num_beams 1) or beam search, or sampling with ``seed``
    max_new_tokens: int = 64
    num_beams: int = 1
    length_penalty: float = 1.0
    do_sample: bool = False
    seed: int = 0
    # seq2seq: also the teacher-forced loss of the reference targets (a second decoder
    # pass per batch); false: generated text and ROUGE only, no loss or perplexity
    target_loss: bool = True


@dataclass
class JobConfig:
    """A whole job file. ``job`` names the kind the file is meant for."""

    job: str = "prepare"
    task: str = "classification"
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    zero: ZeroConfig = field(default_factory=ZeroConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    compress: CompressConfig = field(default_factory=CompressConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    # Free-form notes a user may keep with the run (never read by job code).
    notes: dict[str, Any] = field(default_factory=dict)


def check_choice(problems: list[str], key: str, value: Any, allowed: tuple) -> None:
    """Append a problem naming ``key`` if ``value`` is not one of ``allowed``."""
    if value not in allowed:
        problems.append(f"{key}: got {value!r}; allowed: {', '.join(map(str, allowed))}")


def check_at_least(problems: list[str], key: str, value: float | None, low: float) -> None:
    """Append a problem naming ``key`` if ``value`` is set and below ``low``."""
    if value is not None and value < low:
        problems.append(f"{key}: got {value!r}; must be >= {low}")
