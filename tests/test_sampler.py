"""The deterministic, resumable distributed sampler and dynamic-padding collate."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from scilm_hpc.data.encode import IGNORE_INDEX
from scilm_hpc.data.sampler import ResumableBatches, SamplerPosition, epoch_order
from scilm_hpc.tasks import get_task


def random_lengths(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, 300, size=n)


def take_steps(
    batches: ResumableBatches, position: SamplerPosition, k: int
) -> list[tuple[SamplerPosition, list[np.ndarray]]]:
    return list(itertools.islice(batches.step_batches(position), k))


def all_ranks(
    lengths: np.ndarray, micro: int, accum: int, world: int, seed: int = 3, bucketing: bool = True
) -> list[ResumableBatches]:
    return [
        ResumableBatches(lengths, micro, accum, world, rank, seed, bucketing)
        for rank in range(world)
    ]


def step_examples(
    ranks: list[ResumableBatches], position: SamplerPosition, k: int
) -> tuple[list[list[int]], SamplerPosition]:
    """The examples of each of ``k`` steps over all ranks (in global epoch order) and the
    position after them."""
    per_rank = [take_steps(r, position, k) for r in ranks]
    steps: list[list[int]] = []
    for s in range(k):
        # every rank reports the same position after the step
        assert len({tuple(vars(per_rank[r][s][0]).values()) for r in range(len(ranks))}) == 1
        seen: list[int] = []
        for a in range(ranks[0].accum):  # the global order: micro-step major, then rank
            for r in range(len(ranks)):
                seen += [int(i) for i in per_rank[r][s][1][a]]
        steps.append(seen)
    return steps, per_rank[0][k - 1][0]


# --- epoch_order ------------------------------------------------------------------------


@pytest.mark.parametrize("bucketing", [False, True])
@pytest.mark.parametrize("n", [1, 7, 100, 5000])
def test_epoch_order_is_a_permutation(n, bucketing):
    lengths = random_lengths(n)
    order = epoch_order(lengths, seed=1, epoch=0, micro_batch_size=8, bucketing=bucketing)
    assert order.shape == (n,)
    assert sorted(order.tolist()) == list(range(n))


@pytest.mark.parametrize("bucketing", [False, True])
def test_epoch_order_is_deterministic_per_seed_and_epoch(bucketing):
    lengths = random_lengths(500)
    args = {"micro_batch_size": 8, "bucketing": bucketing}
    a = epoch_order(lengths, seed=5, epoch=2, **args)
    np.testing.assert_array_equal(a, epoch_order(lengths.copy(), seed=5, epoch=2, **args))
    assert not np.array_equal(a, epoch_order(lengths, seed=5, epoch=3, **args))
    assert not np.array_equal(a, epoch_order(lengths, seed=6, epoch=2, **args))
    epochs = [epoch_order(lengths, seed=5, epoch=e, **args).tolist() for e in range(5)]
    assert len({tuple(e) for e in epochs}) == 5


def test_empty_order():
    assert len(epoch_order(np.zeros(0, np.int64), 0, 0, 4, bucketing=True)) == 0


def block_spread(lengths: np.ndarray, order: np.ndarray, micro: int) -> float:
    """Mean (max - min) length over the micro-batch blocks of an order (full blocks only)."""
    usable = len(order) // micro * micro
    blocks = order[:usable].reshape(-1, micro)
    return float(np.mean(np.ptp(lengths[blocks], axis=1)))


@pytest.mark.parametrize("n", [96, 4096 + 512])
def test_bucketing_groups_similar_lengths(n):
    lengths = random_lengths(n, seed=11)
    micro = 8
    plain = epoch_order(lengths, 0, 0, micro, bucketing=False)
    bucketed = epoch_order(lengths, 0, 0, micro, bucketing=True)
    spread_plain = block_spread(lengths, plain, micro)
    spread_bucketed = block_spread(lengths, bucketed, micro)
    assert spread_bucketed < 0.25 * spread_plain, (spread_bucketed, spread_plain)

    # padding waste (what bucketing is for) drops as well
    def padded(order: np.ndarray) -> int:
        blocks = order[: len(order) // micro * micro].reshape(-1, micro)
        return int((lengths[blocks].max(axis=1) * micro).sum())

    assert padded(bucketed) < 0.8 * padded(plain)


def test_bucketed_blocks_are_shuffled_not_sorted():
    lengths = np.arange(96)[::-1].copy()
    order = epoch_order(lengths, 0, 0, 8, bucketing=True)
    block_min = lengths[order.reshape(-1, 8)].min(axis=1)
    assert not np.all(np.diff(block_min) > 0) and not np.all(np.diff(block_min) < 0)


def rank_block_ids(
    lengths_rank: np.ndarray, micro_batches: list[np.ndarray], micro: int
) -> list[set[int]]:
    return [set((lengths_rank[m] // micro).tolist()) for m in micro_batches]


def test_bucketed_micro_batches_are_whole_blocks_when_divisible():
    # distinct lengths: length rank r belongs to sorted block r // micro
    n, micro = 96, 8
    lengths = np.random.default_rng(2).permutation(n) + 10
    rank_of = np.argsort(np.argsort(lengths))
    ranks = all_ranks(lengths, micro, accum=2, world=2)
    for r in ranks:
        for _, micro_batches in take_steps(r, SamplerPosition(), r.steps_per_epoch):
            for m in micro_batches:
                assert len(m) == micro
                assert len(set((rank_of[m] // micro).tolist())) == 1


def test_bucketed_micro_batches_are_whole_blocks_with_a_remainder():
    n, micro = 100, 8  # 12 full blocks and one block of 4
    lengths = np.random.default_rng(2).permutation(n) + 10
    rank_of = np.argsort(np.argsort(lengths))
    straddling = 0
    for seed in range(4):
        batches = ResumableBatches(lengths, micro, 1, 1, 0, seed, bucketing=True)
        for _, (m,) in take_steps(batches, SamplerPosition(), batches.steps_per_epoch):
            straddling += len(set((rank_of[m] // micro).tolist())) > 1
    assert straddling == 0, f"{straddling} of 48 micro-batches mix two length buckets"


# --- ResumableBatches -----------------------------------------------------------------


@pytest.mark.parametrize(("micro", "accum", "world"), [(4, 1, 1), (4, 2, 2), (3, 3, 2), (2, 1, 4)])
@pytest.mark.parametrize("bucketing", [False, True])
def test_step_is_a_disjoint_partition_of_a_consecutive_slice(micro, accum, world, bucketing):
    lengths = random_lengths(101, seed=4)
    ranks = all_ranks(lengths, micro, accum, world, bucketing=bucketing)
    sps = micro * accum * world
    assert ranks[0].samples_per_step == sps
    assert ranks[0].steps_per_epoch == 101 // sps
    order = epoch_order(lengths, 3, 0, micro, bucketing)
    k = ranks[0].steps_per_epoch
    steps, last = step_examples(ranks, SamplerPosition(), k)
    for s, seen in enumerate(steps):
        assert len(seen) == len(set(seen)) == sps  # disjoint across ranks and micro-steps
        assert seen == order[s * sps : (s + 1) * sps].tolist()  # exactly the next slice
    assert last == SamplerPosition(0, k * sps)
    for r in ranks:
        for _, micro_batches in take_steps(r, SamplerPosition(), k):
            assert len(micro_batches) == accum
            assert all(len(m) == micro for m in micro_batches)


def test_positions_count_consumed_samples():
    batches = ResumableBatches(random_lengths(50), 4, 2, 2, 1, 0, True)
    positions = [p for p, _ in take_steps(batches, SamplerPosition(), 3)]
    assert positions == [SamplerPosition(0, 16), SamplerPosition(0, 32), SamplerPosition(0, 48)]


@pytest.mark.parametrize(("accum", "world"), [(1, 1), (2, 2), (3, 2)])
@pytest.mark.parametrize("k", [0, 1, 4, 9])  # 9 crosses into the next epoch
def test_resume_same_world_size_yields_the_same_batches(accum, world, k):
    lengths = random_lengths(90, seed=8)
    for rank in range(world):
        batches = ResumableBatches(lengths, 3, accum, world, rank, 17, True)
        straight = take_steps(batches, SamplerPosition(), k + 12)
        saved = straight[k - 1][0] if k else SamplerPosition()
        # a fresh object, as after a restart
        resumed = take_steps(
            ResumableBatches(lengths, 3, accum, world, rank, 17, True),
            SamplerPosition(saved.epoch, saved.samples_in_epoch),
            12,
        )
        for (p_a, mb_a), (p_b, mb_b) in zip(straight[k:], resumed, strict=True):
            assert p_a == p_b
            assert len(mb_a) == len(mb_b)
            for a, b in zip(mb_a, mb_b, strict=True):
                np.testing.assert_array_equal(a, b)


def epoch_after_world_size_change(
    n: int, micro: int, accum: int, first: int, second: int, k: int, seed: int = 21
) -> tuple[list[int], int, np.ndarray]:
    """Examples seen in epoch 0 when ``first`` ranks run ``k`` steps and ``second`` ranks go
    on from the saved position until the epoch ends; also the new step size and the order."""
    lengths = random_lengths(n, seed=9)
    order = epoch_order(lengths, seed, 0, micro, True)
    before, saved = step_examples(
        all_ranks(lengths, micro, accum, first, seed), SamplerPosition(), k
    )
    assert saved == SamplerPosition(0, k * micro * accum * first)
    after_ranks = all_ranks(lengths, micro, accum, second, seed)
    seen = [i for step in before for i in step]
    position = saved
    while True:
        ((position, _),) = take_steps(after_ranks[0], position, 1)
        if position.epoch != 0:
            break
        step, after = step_examples(
            after_ranks,
            SamplerPosition(0, position.samples_in_epoch - after_ranks[0].samples_per_step),
            1,
        )
        assert after == position
        seen += step[0]
    assert position == SamplerPosition(1, after_ranks[0].samples_per_step)
    return seen, after_ranks[0].samples_per_step, order


@pytest.mark.parametrize(("first", "second"), [(2, 1), (1, 2), (2, 3), (3, 2)])
@pytest.mark.parametrize("accum", [1, 2])
def test_world_size_change_neither_replays_nor_skips(first, second, accum):
    seen, _, order = epoch_after_world_size_change(200, 4, accum, first, second, k=5)
    assert len(seen) == len(set(seen))  # nothing replayed
    assert seen == order[: len(seen)].tolist()  # nothing skipped, in epoch order
    assert len(seen) > 150


def test_world_size_change_in_one_flow():
    """2 ranks for 3 steps, then 1 rank from the saved position, step by step."""
    lengths = random_lengths(64, seed=1)
    order = epoch_order(lengths, 5, 0, 4, True).tolist()
    two = all_ranks(lengths, 4, 1, 2, seed=5)
    seen = []
    streams = [r.step_batches(SamplerPosition()) for r in two]
    for _ in range(3):
        results = [next(s) for s in streams]
        saved = results[0][0]
        seen += [int(i) for _, mb in results for i in mb[0]]
    assert saved == SamplerPosition(0, 24)
    one = ResumableBatches(lengths, 4, 1, 1, 0, 5, True)
    for position, (mb,) in one.step_batches(saved):
        if position.epoch:
            break
        seen += mb.tolist()
    assert seen == order  # 64 = 3 x 8 + 10 x 4: the whole epoch, each example once


def test_world_size_change_drops_only_an_incomplete_last_step():
    # 2 ranks x 4 x 5 steps = 40 consumed; then 3 ranks x 4 = 12 a step: the 160 examples
    # left hold 13 full steps (up to example 196); only the last 4 should be dropped
    seen, sps, _ = epoch_after_world_size_change(200, 4, 1, 2, 3, k=5)
    assert 200 - len(seen) < sps, f"{200 - len(seen)} examples dropped, step size {sps}"


def test_epoch_rollover():
    n, micro = 30, 4  # 7 steps of 4, 2 examples dropped each epoch
    lengths = random_lengths(n, seed=5)
    batches = ResumableBatches(lengths, micro, 1, 1, 0, 2, True)
    assert batches.steps_per_epoch == 7
    steps = take_steps(batches, SamplerPosition(), 16)
    assert [p.epoch for p, _ in steps] == [0] * 7 + [1] * 7 + [2] * 2
    assert [p.samples_in_epoch for p, _ in steps[:8]] == [4, 8, 12, 16, 20, 24, 28, 4]
    for e in (0, 1):
        order = epoch_order(lengths, 2, e, micro, True)
        seen = np.concatenate([mb[0] for _, mb in steps[7 * e : 7 * e + 7]])
        np.testing.assert_array_equal(seen, order[:28])
    assert not np.array_equal(
        np.concatenate([mb[0] for _, mb in steps[:7]]),
        np.concatenate([mb[0] for _, mb in steps[7:14]]),
    )
    # resuming from the position saved at the end of an epoch starts the next one
    resumed = take_steps(batches, steps[6][0], 1)[0]
    assert resumed[0] == SamplerPosition(1, 4)
    np.testing.assert_array_equal(resumed[1][0], steps[7][1][0])


def test_too_few_examples_raises():
    batches = ResumableBatches(random_lengths(5), 4, 1, 2, 0, 0, True)
    assert batches.steps_per_epoch == 0
    with pytest.raises(ValueError, match="fewer examples"):
        next(batches.step_batches(SamplerPosition()))


# --- collate ---------------------------------------------------------------------------


def item(ids: list[int], labels=None) -> dict:
    out = {"input_ids": np.asarray(ids, dtype=np.int32)}
    if labels is not None:
        out["labels"] = labels if isinstance(labels, int) else np.asarray(labels, np.int32)
    return out


def test_collate_classification():
    batch = get_task("classification").collate(
        [item([101, 5, 6, 102], 2), item([101, 7, 102], 0)], pad_id=0
    )
    assert batch["input_ids"].dtype == torch.long
    assert batch["input_ids"].tolist() == [[101, 5, 6, 102], [101, 7, 102, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert batch["labels"].tolist() == [2, 0]
    assert batch["labels"].dtype == torch.long


def test_collate_token_classification_pads_labels_with_ignore_index():
    batch = get_task("token_classification").collate(
        [item([101, 5, 102], [-100, 1, -100]), item([101, 5, 6, 7, 102], [-100, 2, 0, -100, -100])],
        pad_id=9,
    )
    assert IGNORE_INDEX == -100
    assert batch["input_ids"].tolist() == [[101, 5, 102, 9, 9], [101, 5, 6, 7, 102]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch["labels"].tolist() == [[-100, 1, -100, -100, -100], [-100, 2, 0, -100, -100]]
    assert batch["labels"].dtype == torch.long


def test_collate_causal_lm_masks_padding_even_if_pad_id_is_a_real_token():
    # pad id 7 also occurs as a real token: only the padding positions are ignored
    batch = get_task("causal_lm").collate([item([1, 7, 3]), item([1, 7, 3, 7, 5])], pad_id=7)
    assert batch["input_ids"].tolist() == [[1, 7, 3, 7, 7], [1, 7, 3, 7, 5]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch["labels"].tolist() == [[1, 7, 3, -100, -100], [1, 7, 3, 7, 5]]


def test_collate_single_item_has_no_padding():
    batch = get_task("causal_lm").collate([item([4, 5, 6])], pad_id=0)
    assert batch["attention_mask"].tolist() == [[1, 1, 1]]
    assert batch["labels"].tolist() == [[4, 5, 6]]
