"""Tests of verl_npd.trainer.packing (bin packing per data-parallel rank) and of the packed training
step as verl runs it, against each sample alone through a real (tiny, random) transformers Qwen2."""

import itertools
import json
import random

import pytest
import torch
from test_data_parallel import TOPK, RecordingActor, synthetic_samples
from transformers import Qwen2Config, Qwen2ForCausalLM

from verl_npd.losses.distill import NPDLossConfig, per_token_distillation_loss
from verl_npd.trainer.packing import best_fit_decreasing, pack_for_ranks, packing_efficiency, rank_major_order
from verl_npd.trainer.near_policy_trainer import train_packed

VOCAB = 50


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
# The training path, packed, against each sample alone through a real transformers model
# ----------------------------------------------------------------------------------------------
BUDGET = 64


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
    return Qwen2ForCausalLM(config)  # dropout is 0 in this config: train mode computes the same function


def trained_micro_batches(samples):
    """The micro-batches one training step hands verl's engine: the trainer's own batch
    (``train_packed``), split by verl's dispatch and micro-batched by the patched
    ``prepare_micro_batches``, with the global-batch values verl's engine adds."""
    import verl  # noqa: F401  (loads the plugin: the micro-batch dispatch and the npd_* losses)
    from verl.utils import tensordict_utils as tu

    actor = RecordingActor(data_parallel_size=1)
    packed = train_packed(
        actor, samples, data_parallel_size=1, pad_id=0, token_budget=BUDGET,
        temperature=1.0, seed=0,
    )
    (micro_batches,) = actor.micro_batches
    assert len(micro_batches) == len(packed.rank_bins[0]) > 1  # gradients accumulate over micro-batches
    loss_tokens = sum(len(s.response_ids) for s in samples)
    for micro_batch in micro_batches:
        # verl/workers/engine/base.py forward_backward_batch: token-mean over the global batch.
        tu.assign_non_tensor(micro_batch, batch_num_tokens=loss_tokens, dp_size=1)
    return micro_batches


def verl_forward(model, micro_batch):
    """The student's logits ``(total_nnz, V)`` of one packed micro-batch, with the inputs verl's FSDP
    engine builds for it (remove-padding: one row, positions restarting per sample, no mask)."""
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead

    engine = FSDPEngineWithLMHead.__new__(FSDPEngineWithLMHead)  # the input preparation only
    engine.pad_to_length, engine.use_ulysses_sp = None, False
    model_inputs, _ = engine.prepare_model_inputs(micro_batch)
    assert model_inputs["attention_mask"] is None and model_inputs["input_ids"].shape[0] == 1
    return model(**model_inputs, use_cache=False).logits[0]


def verl_configs(loss_name: str, **loss_fields):
    from verl.workers.config import DistillationConfig, DistillationLossConfig, FSDPActorConfig

    actor = FSDPActorConfig(strategy="fsdp2", ppo_micro_batch_size_per_gpu=1, ppo_mini_batch_size=1, rollout_n=1)
    loss = DistillationLossConfig(
        loss_mode=loss_name, topk=TOPK, use_policy_gradient=False, use_task_rewards=False, loss_max_clamp=None,
        **loss_fields,
    )
    return actor, DistillationConfig(enabled=False, distillation_loss=loss)


def test_packed_logits_equal_each_sample_alone(tiny_qwen2):
    samples = synthetic_samples(3, 8, vocab=VOCAB, max_prompt=8, max_response=12)
    micro_batch = trained_micro_batches(samples)[0]
    with torch.no_grad():
        logits = verl_forward(tiny_qwen2, micro_batch)
        offsets = micro_batch["input_ids"].offsets()
        rows = micro_batch["input_ids"].unbind()
        assert len(rows) > 1
        for row, ids in enumerate(rows):
            alone = tiny_qwen2(input_ids=ids.unsqueeze(0)).logits[0]
            torch.testing.assert_close(logits[offsets[row] : offsets[row + 1]], alone, rtol=1e-5, atol=1e-5)
        # Control: without restarting positions the samples do see each other.
        leaky = tiny_qwen2(input_ids=micro_batch["input_ids"].values().unsqueeze(0)).logits[0]
        assert (leaky[offsets[-2] :] - logits[offsets[-2] :]).abs().max() > 1e-2


@pytest.mark.parametrize(
    "loss_name, settings, chunk_size",
    [
        ("npd_forward_kl_topk", {}, 4096),
        ("npd_jsd", {"tail_mode": "bucket", "beta": 0.3}, 7),
        ("npd_ce", {}, 4096),
    ],
)
def test_packed_training_step_gives_the_loss_and_gradients_of_each_sample_alone(
    tiny_qwen2, monkeypatch, loss_name, settings, chunk_size
):
    """One training step as verl runs it (the trainer's batch, the micro-batch dispatch, verl's model
    inputs, the registered loss through verl's ``distillation_ppo_loss``), packed, against plain torch
    on one sample at a time: every response token's loss summed, over the batch's response tokens."""
    from verl.trainer.distillation.losses import distillation_ppo_loss

    from verl_npd.losses.verl_registration import ENV_VAR

    monkeypatch.setenv(ENV_VAR, json.dumps(settings))
    samples = synthetic_samples(5, 12, vocab=VOCAB, max_prompt=8, max_response=20)
    model = tiny_qwen2
    loss_tokens = sum(len(s.response_ids) for s in samples)

    model.zero_grad()
    loss_mode = loss_name.removeprefix("npd_")
    reference = torch.zeros(())
    for s in samples:
        ids = torch.tensor(s.prompt.prompt_ids + s.response_ids)
        p = len(s.prompt.prompt_ids)
        logits = model(input_ids=ids.unsqueeze(0)).logits[0]
        scored = slice(p - 1, len(ids) - 1)  # the positions predicting the response; teacher entry t scores t + 1
        reference = reference + per_token_distillation_loss(
            logits[scored], s.teacher_topk_ids[scored], s.teacher_topk_log_probs[scored], loss_mode,
            NPDLossConfig(**settings), target_ids=ids[p:], topk=TOPK,
        ).loss.sum()
    reference = reference / loss_tokens
    reference.backward()
    reference_grads = {name: p.grad.clone() for name, p in model.named_parameters()}

    model.zero_grad()
    actor, distillation = verl_configs(loss_name, chunked_topk_chunk_size=chunk_size)
    packed_total = 0.0
    for micro_batch in trained_micro_batches(samples):
        logits = verl_forward(model, micro_batch).unsqueeze(0)
        # verl's logits processor, then its final loss (FSDPEngineWithLMHead.prepare_model_outputs, forward_step).
        outputs = distillation_ppo_loss(actor, distillation, data=micro_batch, student_logits=logits)
        offsets = micro_batch["input_ids"].offsets()
        model_output = {k: torch.nested.nested_tensor_from_jagged(v.squeeze(0), offsets) for k, v in outputs.items()}
        loss, _ = distillation_ppo_loss(actor, distillation, model_output=model_output, data=micro_batch)
        loss.backward()
        packed_total += loss.item()

    assert reference.item() > 0
    assert packed_total == pytest.approx(reference.item(), rel=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, reference_grads[name], rtol=1e-4, atol=1e-6, msg=name)
