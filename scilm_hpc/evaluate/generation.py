"""Generation evaluation over MPI ranks: teacher-forced loss and generated text per example.

The batches do not depend on the number of ranks: within each shard the examples are
sorted by length and cut into ``eval.batch_size`` chunks, in a fixed order. The ranks
then share these batches by their estimated cost (``rank_batches``: the encoder or
prompt pass over the padded batch plus ``eval.max_new_tokens`` decoding steps per
sequence, which cost about the same in every batch), the costliest first to the
least-loaded rank. Every example is therefore generated in the same batch, with the
same padding, whatever the number of ranks, and the generated text is identical for 1,
2 or N ranks. Decoder-only prompts are padded on the left, so that generation continues
every prompt right at its end. An encoder-decoder reads each source once: the encoder's
output feeds both the teacher-forced loss pass and ``generate``.

The same routine generates on the training ranks during fine-tuning (dev ROUGE,
``generation_metrics``). There the model may be a DeepSpeed engine whose parameters
ZeRO-3 partitions: every forward pass gathers them collectively, so all ranks must run
the same number of ``generate`` calls (a rank out of batches generates a discarded
one-example batch) and every call must run until all ranks are done
(``synced_gpus=True``: a rank whose sequences ended keeps stepping with the others).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch

from scilm_hpc.data.dataset import ShardDataset
from scilm_hpc.errors import UserError
from scilm_hpc.schema import EvalConfig
from scilm_hpc.tasks import ExampleResult
from scilm_hpc.tasks.seq2seq import ENCODER_DECODER, Seq2Seq, eos_token_id, rouge_scores


def generation_batches(
    dataset: ShardDataset, batch_size: int, limit: int | None = None
) -> list[np.ndarray]:
    """Example indices of every batch, shard by shard, length-sorted within a shard
    (``limit``: the first ``limit`` examples only)."""
    lengths = dataset.lengths()
    starts = np.concatenate([[0], np.cumsum([s.n_examples for s in dataset.shards])])
    end = len(dataset) if limit is None else min(limit, len(dataset))
    batches: list[np.ndarray] = []
    for lo, hi in zip(starts[:-1], starts[1:], strict=True):
        order = np.arange(lo, min(hi, end), dtype=np.int64)
        order = order[np.argsort(lengths[order], kind="stable")]
        batches += [order[i : i + batch_size] for i in range(0, order.size, batch_size)]
    return batches


# What one generated token costs against one padded source token of the batch's encoder
# (or prompt) pass: MiniLM -> MiniLM on one CPU thread, batch 16 of SciTLDR abstracts,
# measured 260-280 us per source token and 2.6-3.0 ms per generated token (docs/decisions.md).
DECODE_WEIGHT = 10


def batch_costs(
    batches: list[np.ndarray], lengths: np.ndarray, new_tokens: int, beams: int
) -> np.ndarray:
    """Estimated generation cost of each batch, in padded source tokens: the batch padded
    to its longest example, plus ``new_tokens`` decoding steps of ``beams`` sequences per
    example at ``DECODE_WEIGHT`` each (an upper bound: a batch may stop early at EOS)."""
    return np.asarray(
        [len(b) * (int(lengths[b].max()) + new_tokens * beams * DECODE_WEIGHT) for b in batches],
        dtype=np.int64,
    )


def rank_batches(costs: np.ndarray, world: int) -> list[list[int]]:
    """The batches of each rank, each rank's in batch order: the costliest batch first,
    each to the rank with the least cost so far (ties: the lower rank). Deterministic for
    given costs and world size; unlike contiguous ranges of length-sorted batches it does
    not leave the longest batches to the last rank."""
    loads = [0] * world
    mine: list[list[int]] = [[] for _ in range(world)]
    for b in sorted(range(len(costs)), key=lambda i: (-int(costs[i]), i)):
        rank = min(range(world), key=lambda r: (loads[r], r))
        loads[rank] += int(costs[b])
        mine[rank].append(b)
    return [sorted(m) for m in mine]


def check_model_fits(model: Any, dataset: ShardDataset, name: str) -> None:
    """Refuse a model that cannot generate, or whose kind differs from the shards'.

    Raises:
        UserError: naming the model and what the shards were prepared for.
    """
    if not model.can_generate():
        raise UserError(
            f"model.name_or_path: '{name}' ({type(model).__name__}) cannot generate text"
        )
    prepared = dataset.manifest.get("task_options", {}).get("model_kind")
    kind = ENCODER_DECODER if model.config.is_encoder_decoder else "decoder-only"
    if prepared is not None and prepared != kind:
        raise UserError(
            f"model.name_or_path: '{name}' is {kind}, the shards in '{dataset.root}' were "
            f"prepared for a {prepared} model; prepare them again with this model"
        )


def _encode(generator: Any, inputs: dict[str, Any], prompts: dict[str, Any]) -> Any:
    """The encoder's output for a batch's sources (what ``generate`` would compute)."""
    # the loss pass and generation read the same right-padded sources
    assert all(torch.equal(inputs[k], prompts[k]) for k in ("input_ids", "attention_mask"))
    encoder = generator.get_encoder()
    return encoder(
        input_ids=prompts["input_ids"], attention_mask=prompts["attention_mask"], return_dict=True
    )


def _decoder_inputs(generator: Any, inputs: dict[str, Any], encoder_outputs: Any) -> dict[str, Any]:
    """The teacher-forced pass's inputs on a computed encoder output: the decoder reads
    the shifted target as the model would shift its ``labels``, but the model computes
    no loss of its own (``example_results`` computes the per-example losses) and keeps
    no cache (the same logits, measured 20% less time on a MiniLM pair)."""
    shift = getattr(generator, "prepare_decoder_input_ids_from_labels", None)
    if shift is None:  # a model that only takes labels: let it shift them itself
        return {**inputs, "encoder_outputs": encoder_outputs}
    return {
        "attention_mask": inputs["attention_mask"],
        "encoder_outputs": encoder_outputs,
        "decoder_input_ids": shift(labels=inputs["labels"]),
        "decoder_attention_mask": inputs["decoder_attention_mask"],
        "use_cache": False,
    }


def _generated_tokens(sequence: list[int], eos: int, skip_first: bool) -> list[int]:
    """The generated tokens up to (without) the first EOS."""
    tokens = sequence[1:] if skip_first else sequence
    return tokens[: tokens.index(eos)] if eos in tokens else tokens


@torch.no_grad()
def generate_predictions(
    model: Any,
    tokenizer: Any,
    dataset: ShardDataset,
    task: Seq2Seq,
    pad_id: int,
    options: EvalConfig,
    rank: int,
    world: int,
    limit: int | None = None,
    synced: bool = False,
    score: bool = True,
) -> list[tuple[int, ExampleResult]]:
    """(example index, (loss sum, target tokens, prediction, references)) for this rank's
    batches; the prediction holds the record id, source text, generated text and its
    length in tokens.

    Args:
        model: a HF model, or a DeepSpeed engine (its ``module`` generates).
        limit: generate for the first ``limit`` examples only (None: all).
        synced: the ranks hold partitioned parameters (ZeRO-3): run as many ``generate``
            calls on every rank and keep them in step (``synced_gpus``).
        score: also the teacher-forced target loss (False: loss sum and count 0).
    """
    batches = generation_batches(dataset, options.batch_size, limit)
    costs = batch_costs(batches, dataset.lengths(), options.max_new_tokens, options.num_beams)
    ranks = rank_batches(costs, world)
    mine = ranks[rank]
    calls = max(len(r) for r in ranks) if synced else len(mine)
    device = getattr(model, "device", torch.device("cpu"))
    generator = getattr(model, "module", model)  # a DeepSpeed engine wraps the HF model
    eos = eos_token_id(tokenizer)
    encoder_decoder = bool(generator.config.is_encoder_decoder)
    out: list[tuple[int, ExampleResult]] = []
    for call in range(calls):
        real = call < len(mine)
        b = mine[call] if real else 0
        chunk = batches[b] if real else batches[0][:1]  # in step with the other ranks
        items = [dataset[int(i)] for i in chunk]
        prompts = {k: v.to(device) for k, v in task.generation_inputs(items, pad_id).items()}
        scores: list[ExampleResult] = [(0.0, 0, None, None)] * len(items)
        if score:
            batch = task.collate(items, pad_id)
            inputs = {k: v.to(device) for k, v in task.forward_inputs(batch).items()}
            if encoder_decoder:  # one encoder pass for the loss and for ``generate``
                prompts["encoder_outputs"] = _encode(generator, inputs, prompts)
                inputs = _decoder_inputs(generator, inputs, prompts["encoder_outputs"])
            scores = task.example_results(model(**inputs).logits.cpu(), batch)
        if options.do_sample:
            torch.manual_seed(options.seed + b)  # per batch: the same for any rank count
        generated = generator.generate(
            **prompts,
            max_new_tokens=options.max_new_tokens,
            num_beams=options.num_beams,
            length_penalty=options.length_penalty,
            do_sample=options.do_sample,
            pad_token_id=pad_id,
            eos_token_id=eos,
            synced_gpus=synced,
        ).cpu()
        if not real:
            continue
        if not encoder_decoder:  # decoder-only: the prompt comes back first
            generated = generated[:, prompts["input_ids"].shape[1] :]
        for row, (index, item, result) in enumerate(zip(chunk, items, scores, strict=True)):
            new = _generated_tokens(generated[row].tolist(), eos, encoder_decoder)
            prediction = {
                "id": item["record"],
                "source": item["source_text"],
                "generated": tokenizer.decode(new, skip_special_tokens=True).strip(),
                "gen_tokens": len(new),
            }
            out.append(
                (int(index), (result[0], result[1], prediction, json.loads(item["references"])))
            )
    return out


def generation_metrics(
    model: Any,
    tokenizer: Any,
    dataset: ShardDataset,
    task: Seq2Seq,
    pad_id: int,
    options: EvalConfig,
    limit: int | None,
    rank: int = 0,
    world: int = 1,
    synced: bool = False,
) -> dict[str, float] | None:
    """ROUGE-1/2/L/Lsum, mean generated length and the number of examples generated
    (``generated_examples``) for the first ``limit`` examples of ``dataset``, generated
    over the ranks of the default process group (``world`` > 1) or in this process.
    The dict on rank 0, None on the others.
    """
    import torch.distributed as dist

    results = generate_predictions(
        model, tokenizer, dataset, task, pad_id, options, rank, world, limit, synced, score=False
    )
    gathered: list[Any] = [results]
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, results)
    if rank != 0:
        return None
    merged = sorted((item for part in gathered for item in part), key=lambda x: x[0])
    predictions = [r[2] for _, r in merged]
    scores = rouge_scores([p["generated"] for p in predictions], [r[3] for _, r in merged])
    return {
        **scores,
        "gen_length": float(np.mean([p["gen_tokens"] for p in predictions])) if merged else 0.0,
        "generated_examples": len(merged),
    }
