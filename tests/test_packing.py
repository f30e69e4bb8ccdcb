"""Tests of verl_npd.losses.packing: bin packing, packed micro-batches, and packed == padded through a
real (tiny, random) transformers Qwen2."""

import itertools
import random

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from verl_npd.losses.distill import NPDLossConfig, per_token_distillation_loss, reduce_token_loss
from verl_npd.losses.packing import (
    best_fit_decreasing,
    build_packed_micro_batch,
    packed_causal_lm_forward,
    pack_for_ranks,
    packing_efficiency,
    rank_major_order,
    response_loss_mask,
    unpack,
)

VOCAB, TOPK = 50, 5


# ----------------------------------------------------------------------------------------------
# Bin packing
# ----------------------------------------------------------------------------------------------
def first_fit(lengths: list[int], budget: int) -> list[list[int]]:
    """Reference: first-fit in arrival order (each sample into the first bin with room)."""
    bins, rooms = [], []
    for index, length in enumerate(lengths):
        for b, room in enumerate(rooms):
            if room >= length:
                bins[b].append(index)
                rooms[b] -= length
                break
        else:
            bins.append([index])
            rooms.append(budget - length)
    return bins


def long_tailed_lengths(rng: random.Random, n: int, budget: int) -> list[int]:
    return [min(budget, max(1, int(rng.lognormvariate(5.0, 0.9)))) for _ in range(n)]


def test_hand_worked_example():
    # Longest first: 8 -> bin0 (room 2); 5 -> bin1 (room 5); 3 -> bin1, the only fit (room 2);
    # 2 (index 2) -> tie of rooms 2/2, the first-opened bin; 2 (index 4) -> bin1.
    assert best_fit_decreasing([3, 8, 2, 5, 2], budget=10) == [[1, 2], [3, 0, 4]]
    assert packing_efficiency([3, 8, 2, 5, 2], [[1, 2], [3, 0, 4]], 10) == 1.0
    assert packing_efficiency([3, 8], [[0], [1]], 10) == pytest.approx(11 / 20)


def test_best_fit_prefers_the_tightest_bin():
    # 7 -> bin0 (room 3); 4, 4 -> bin1 (room 2). The 1 fits both: best fit takes the room-2 bin, where
    # first-fit decreasing would take bin0.
    assert best_fit_decreasing([7, 4, 4, 1], budget=10) == [[0], [1, 2, 3]]


@pytest.mark.parametrize("budget", [256, 1024, 4096])
def test_bins_respect_budget_cover_every_sample_once_and_beat_first_fit(budget):
    for seed in range(40):
        rng = random.Random(seed)
        lengths = long_tailed_lengths(rng, rng.randint(1, 300), budget)
        bins = best_fit_decreasing(lengths, budget)
        assert sorted(i for bin_ in bins for i in bin_) == list(range(len(lengths)))
        assert all(sum(lengths[i] for i in bin_) <= budget for bin_ in bins)
        reference = packing_efficiency(lengths, first_fit(lengths, budget), budget)
        assert packing_efficiency(lengths, bins, budget) >= reference
        # Never worse than the volume bound allows by much (BFD <= 11/9 OPT + 6/9, OPT >= volume bound).
        lower_bound = -(-sum(lengths) // budget)
        assert len(bins) <= 11 / 9 * lower_bound + 6 / 9 + 1e-9


def test_efficiency_target_on_a_realistic_batch():
    rng = random.Random(0)
    lengths = long_tailed_lengths(rng, 512, 4096)
    bins = best_fit_decreasing(lengths, 4096)
    assert packing_efficiency(lengths, bins, 4096) >= 0.97


def test_over_long_sample_raises_with_index_and_lengths():
    with pytest.raises(ValueError, match=r"sample 2 has 11 tokens.*budget of 10"):
        best_fit_decreasing([3, 4, 11, 2], budget=10)
    with pytest.raises(ValueError, match="sample 1 has length 0"):
        best_fit_decreasing([3, 0], budget=10)


def test_truncate_packs_an_over_long_sample_alone_and_counts_budget_tokens():
    bins = best_fit_decreasing([3, 4, 11, 2], budget=10, truncate=True)
    assert [2] in bins
    assert sorted(i for bin_ in bins for i in bin_) == [0, 1, 2, 3]
    assert packing_efficiency([3, 4, 11, 2], bins, 10) == pytest.approx((3 + 4 + 10 + 2) / (10 * len(bins)))


# ----------------------------------------------------------------------------------------------
# Packing per data-parallel rank
# ----------------------------------------------------------------------------------------------
def fewest_bins(sizes: list[int], budget: int) -> int:
    """Reference: the optimal bin count, by exhaustive search (tiny inputs only)."""
    best = len(sizes)

    def place(i: int, loads: list[int]) -> None:
        nonlocal best
        if len(loads) >= best:
            return
        if i == len(sizes):
            best = len(loads)
            return
        for b in range(len(loads)):
            if loads[b] + sizes[i] <= budget:
                loads[b] += sizes[i]
                place(i + 1, loads)
                loads[b] -= sizes[i]
        place(i + 1, loads + [sizes[i]])

    place(0, [])
    return best


def fewest_bins_per_rank(sizes: list[int], budget: int, num_ranks: int) -> int:
    """Reference: the least bins per rank over every split into ranks of equal sample counts."""
    per_rank = len(sizes) // num_ranks
    best = len(sizes)

    def split(remaining: list[int], worst: int) -> None:
        nonlocal best
        if worst >= best:
            return
        if not remaining:
            best = worst
            return
        first, rest = remaining[0], remaining[1:]
        for others in itertools.combinations(rest, per_rank - 1):
            share = [first, *others]
            bins = fewest_bins([sizes[i] for i in share], budget)
            split([i for i in rest if i not in others], max(worst, bins))

    split(list(range(len(sizes))), 0)
    return best


def check_rank_packing(lengths: list[int], budget: int, num_ranks: int, rank_bins) -> None:
    """The guarantees of pack_for_ranks, checked from scratch."""
    assert len(rank_bins) == num_ranks
    flat = [i for bins in rank_bins for bin_ in bins for i in bin_]
    assert sorted(flat) == list(range(len(lengths)))  # every sample exactly once
    assert all(sum(len(bin_) for bin_ in bins) == len(lengths) // num_ranks for bins in rank_bins)
    assert len({len(bins) for bins in rank_bins}) == 1  # the same number of micro-batches on every rank
    for bins in rank_bins:
        tokens = [sum(lengths[i] for i in bin_) for bin_ in bins]
        assert all(bin_ for bin_ in bins) and max(tokens) <= budget
        assert tokens == sorted(tokens, reverse=True)
    rank_tokens = [sum(lengths[i] for bin_ in bins for i in bin_) for bins in rank_bins]
    assert max(rank_tokens) - min(rank_tokens) <= max(lengths)


def test_rank_packing_hand_worked_example():
    # Dealt longest first to the lighter rank that still has room (4 samples each, ties to rank 0):
    # 8 -> r0, 7 -> r1, 6 -> r1, 5 -> r0, 2 -> r0, 2 -> r1, 1 -> r0 (now full), 1 -> r1: 16/16 tokens.
    # Best fit within r0 {8, 5, 2, 1}: [8, 2], [5, 1]; within r1 {7, 6, 2, 1}: [7, 2, 1], [6].
    lengths = [8, 7, 6, 5, 2, 2, 1, 1]
    rank_bins = pack_for_ranks(lengths, budget=10, num_ranks=2)
    assert rank_bins == [[[0, 4], [3, 6]], [[1, 5, 7], [2]]]
    assert rank_major_order(rank_bins) == ([0, 4, 3, 6, 1, 5, 7, 2], [0, 0, 1, 1, 0, 0, 0, 1])
    assert packing_efficiency(lengths, [b for bins in rank_bins for b in bins], 10) == 32 / 40


def test_a_rank_with_fewer_bins_gets_whole_samples_split_out_at_packing_time():
    # 6 + 6 > 10 and 6 + 5 > 10: whichever rank holds the 5 needs two bins, so both run two; rank 1
    # ({6, 1}, one bin by tokens) gets its two samples in separate bins.
    rank_bins = pack_for_ranks([6, 6, 5, 1], budget=10, num_ranks=2)
    assert rank_bins == [[[0], [2]], [[1], [3]]]
    assert fewest_bins_per_rank([6, 6, 5, 1], 10, 2) == 2


def test_one_rank_is_best_fit_decreasing():
    rng = random.Random(3)
    lengths = long_tailed_lengths(rng, 200, 1024)
    (bins,) = pack_for_ranks(lengths, 1024, 1)
    assert sorted(map(sorted, bins)) == sorted(map(sorted, best_fit_decreasing(lengths, 1024)))


@pytest.mark.parametrize("num_ranks", [1, 2, 3, 6])
def test_rank_packing_guarantees_on_long_tailed_batches(num_ranks):
    for seed in range(30):
        rng = random.Random(seed)
        budget = rng.choice([256, 1024, 4096])
        lengths = long_tailed_lengths(rng, num_ranks * rng.randint(1, 64), budget)
        rank_bins = pack_for_ranks(lengths, budget, num_ranks)
        check_rank_packing(lengths, budget, num_ranks, rank_bins)


def test_rank_packing_is_within_one_bin_of_the_optimum():
    for seed in range(300):
        rng = random.Random(seed)
        num_ranks, per_rank, budget = rng.choice([2, 3]), rng.randint(1, 3), rng.randint(8, 30)
        lengths = [rng.randint(1, budget) for _ in range(num_ranks * per_rank)]
        rank_bins = pack_for_ranks(lengths, budget, num_ranks)
        check_rank_packing(lengths, budget, num_ranks, rank_bins)
        optimum = fewest_bins_per_rank(lengths, budget, num_ranks)
        assert optimum <= len(rank_bins[0]) <= optimum + 1, (lengths, budget, rank_bins)


def test_rank_packing_needs_an_even_split():
    with pytest.raises(ValueError, match="5 samples cannot be split evenly over 2 data-parallel ranks"):
        pack_for_ranks([1, 2, 3, 4, 5], budget=10, num_ranks=2)
    with pytest.raises(ValueError, match="sample 1 has 11 tokens"):
        pack_for_ranks([1, 11], budget=10, num_ranks=2)


# ----------------------------------------------------------------------------------------------
# Packed micro-batch tensors
# ----------------------------------------------------------------------------------------------
def make_samples(seed: int, prompt_lens, response_lens):
    gen = torch.Generator().manual_seed(seed)
    samples = []
    for p, r in zip(prompt_lens, response_lens):
        length = p + r
        teacher_logits = 2 * torch.randn(length, VOCAB, generator=gen)
        lp, ids = torch.log_softmax(teacher_logits, -1).topk(TOPK)
        samples.append(
            {
                "input_ids": torch.randint(0, VOCAB, (length,), generator=gen),
                "loss_mask": response_loss_mask(p, length),
                "teacher_topk_ids": ids,
                "teacher_topk_log_probs": lp,
            }
        )
    return samples


def test_packed_micro_batch_layout():
    samples = make_samples(0, [2, 3, 1], [3, 1, 2])
    packed = build_packed_micro_batch(samples, [2, 0, 1])
    assert packed.cu_seqlens.tolist() == [0, 3, 8, 12]
    assert packed.position_ids.tolist() == [0, 1, 2, 0, 1, 2, 3, 4, 0, 1, 2, 3]
    assert torch.equal(packed.input_ids, torch.cat([samples[i]["input_ids"] for i in (2, 0, 1)]))
    # Loss positions predict response tokens; never a sample's last position.
    assert packed.loss_mask.tolist() == [1, 1, 0, 0, 1, 1, 1, 0, 0, 0, 1, 0]
    # Targets are the next token inside the same sample.
    ids = samples[0]["input_ids"]
    assert packed.target_ids[3:7].tolist() == ids[1:].tolist()
    for key in samples[0]:
        if key != "loss_mask":
            pieces = unpack(packed.tensors[key], packed.cu_seqlens)
            assert all(torch.equal(piece, samples[i][key]) for piece, i in zip(pieces, (2, 0, 1)))
    # The same micro-batch as verl's jagged nested tensors (remove-padding input).
    nested = packed.nested("input_ids")
    assert torch.equal(nested.values(), packed.input_ids)
    assert torch.equal(nested.offsets(), packed.cu_seqlens)
    assert torch.equal(unpack(packed.input_ids.unsqueeze(0), packed.cu_seqlens)[1], samples[0]["input_ids"])


def test_response_loss_mask():
    assert response_loss_mask(3, 6).tolist() == [0, 0, 1, 1, 1, 0]
    with pytest.raises(ValueError):
        response_loss_mask(6, 6)


def test_build_respects_budget_and_truncation():
    samples = make_samples(1, [2, 10], [3, 4])
    with pytest.raises(ValueError, match="sample 1 has 14 tokens"):
        build_packed_micro_batch(samples, [1], budget=8)
    with pytest.raises(ValueError, match="more than the budget"):
        build_packed_micro_batch(samples, [0, 1], budget=16)
    packed = build_packed_micro_batch(samples, [1], budget=8, truncate=True)
    assert packed.num_tokens == 8
    assert torch.equal(packed.input_ids, samples[1]["input_ids"][:8])
    assert packed.loss_mask.tolist() == [False] * 8  # the prompt fills the budget: nothing left to train
    assert packed.tensors["teacher_topk_ids"].shape == (8, TOPK)


def test_packed_forward_refuses_unknown_attention():
    class Fake(torch.nn.Module):
        config = type("C", (), {"_attn_implementation": "my_kernel"})()

    with pytest.raises(ValueError, match="my_kernel"):
        packed_causal_lm_forward(Fake(), build_packed_micro_batch(make_samples(2, [1], [1]), [0]))


# ----------------------------------------------------------------------------------------------
# Packed == padded through a real transformers model
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_qwen2():
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=128,
        attn_implementation="sdpa",
    )
    return Qwen2ForCausalLM(config).eval()  # eval: no dropout, so both runs see the same function


def test_packed_logits_equal_each_sample_alone(tiny_qwen2):
    samples = make_samples(3, [4, 2, 6], [5, 7, 1])
    packed = build_packed_micro_batch(samples, [0, 1, 2])
    with torch.no_grad():
        logits = packed_causal_lm_forward(tiny_qwen2, packed)
        for i, piece in enumerate(unpack(logits, packed.cu_seqlens)):
            alone = tiny_qwen2(input_ids=samples[i]["input_ids"].unsqueeze(0)).logits[0]
            torch.testing.assert_close(piece, alone, rtol=1e-5, atol=1e-5)
        # Control: without restarting positions the samples do see each other.
        leaky = tiny_qwen2(input_ids=packed.input_ids.unsqueeze(0)).logits[0]
        assert (unpack(leaky, packed.cu_seqlens)[2] - logits[packed.cu_seqlens[2] :]).abs().max() > 1e-2


def _padded_loss(model, samples, config, global_tokens):
    """Reference path: right-padded batch, 2D attention mask, per-sample positions."""
    width = max(s["input_ids"].shape[0] for s in samples)
    bsz = len(samples)
    input_ids = torch.zeros(bsz, width, dtype=torch.long)
    attention = torch.zeros(bsz, width, dtype=torch.long)
    loss_mask = torch.zeros(bsz, width, dtype=torch.bool)
    targets = torch.zeros(bsz, width, dtype=torch.long)
    teacher_ids = torch.zeros(bsz, width, TOPK, dtype=torch.long)
    teacher_lp = torch.full((bsz, width, TOPK), float("-inf"))
    for row, s in enumerate(samples):
        n = s["input_ids"].shape[0]
        input_ids[row, :n] = s["input_ids"]
        attention[row, :n] = 1
        loss_mask[row, : n - 1] = s["loss_mask"][: n - 1]
        targets[row, : n - 1] = s["input_ids"][1:]
        teacher_ids[row, :n] = s["teacher_topk_ids"]
        teacher_lp[row, :n] = s["teacher_topk_log_probs"]
    position_ids = torch.arange(width).expand(bsz, width)
    logits = model(input_ids=input_ids, attention_mask=attention, position_ids=position_ids).logits
    per_token = per_token_distillation_loss(logits, teacher_ids, teacher_lp, config, targets).loss
    return reduce_token_loss(per_token, loss_mask, global_tokens)


@pytest.mark.parametrize(
    "config",
    [
        NPDLossConfig(),
        NPDLossConfig(loss_mode="jsd", tail_mode="bucket", beta=0.3),
        NPDLossConfig(loss_mode="ce"),
    ],
    ids=["forward_kl_renorm", "jsd_bucket", "ce"],
)
def test_packed_and_padded_give_same_loss_and_gradients(tiny_qwen2, config):
    rng = random.Random(5)
    prompt_lens = [rng.randint(1, 8) for _ in range(9)]
    response_lens = [max(1, int(rng.lognormvariate(2.0, 0.8))) for _ in range(9)]
    samples = make_samples(4, prompt_lens, response_lens)
    global_tokens = sum(int(s["loss_mask"][:-1].sum()) for s in samples)
    model = tiny_qwen2.train()  # train mode (dropout is 0 in this config) with gradients

    model.zero_grad()
    padded = _padded_loss(model, samples, config, global_tokens)
    padded.backward()
    padded_grads = {name: p.grad.clone() for name, p in model.named_parameters()}

    model.zero_grad()
    lengths = [s["input_ids"].shape[0] for s in samples]
    bins = best_fit_decreasing(lengths, budget=32)
    assert len(bins) > 1  # several micro-batches, gradients accumulate across them
    packed_total = 0.0
    for bin_ in bins:
        packed = build_packed_micro_batch(samples, bin_, budget=32)
        logits = packed_causal_lm_forward(model, packed)
        teacher_ids, teacher_lp = packed.tensors["teacher_topk_ids"], packed.tensors["teacher_topk_log_probs"]
        per_token = per_token_distillation_loss(logits, teacher_ids, teacher_lp, config, packed.target_ids).loss
        loss = reduce_token_loss(per_token, packed.loss_mask, global_tokens)
        loss.backward()
        packed_total += loss.item()
    model.eval()

    assert packed_total == pytest.approx(padded.item(), rel=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, padded_grads[name], rtol=1e-4, atol=1e-6, msg=name)
