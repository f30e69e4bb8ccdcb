"""Sequence packing for the packed-SFT step: which samples share a micro-batch, on which rank.

Samples of very different lengths (long-tailed responses) are bin-packed, best-fit decreasing, into
micro-batches holding at most ``budget`` tokens each (:func:`pack_for_ranks`, per data-parallel
rank). The trainer lays the batch out rank-major (:func:`rank_major_order`) and names each sample's
micro-batch; :mod:`verl_npd.trainer.packed_micro_batches` makes verl's engine train exactly those
micro-batches. Packing efficiency = real tokens / (micro-batches x budget).

**Attention never crosses a sample boundary.** verl's FSDP engine with ``use_remove_padding=True``
(``FSDPEngineWithLMHead.prepare_model_inputs``) concatenates a micro-batch's samples into one row
and calls the model with ``input_ids [1, T]``, ``position_ids [1, T]`` (restarting at 0 for every
sample) and ``attention_mask=None``. transformers (read and tested on 5.10, the range verl 0.9.1
allows) then handles packing natively for every attention implementation it ships:

- sdpa / eager / flex_attention: ``masking_utils._preprocess_mask_arguments`` calls
  ``find_packed_sequence_indices(position_ids)`` whenever the 2D mask is None and there is no cache;
  a position that is not previous + 1 starts a new sequence, and ``create_causal_mask`` ANDs the
  causal mask with a "same sequence" mask: an exact block-diagonal causal mask. This is the CPU route
  (dense [T, T] mask, so attention costs O(T^2) per micro-batch rather than O(sum L_i^2)).
- flash_attention_2/3: ``modeling_flash_attention_utils`` detects the restarting positions
  (``_is_packed_sequence``) and calls the varlen kernel with cu_seqlens derived from them.

With remove-padding, verl's ``apply_monkey_patch`` replaces only transformers' flash-attention
forward (to add the Ulysses all-to-all); with sdpa (the CPU case) verl relies on this detection.
tests/test_packing.py checks the whole step (the trainer's batch, the dispatch, verl's model inputs
and loss) against each sample alone. What verl lacks is the *choice* of which samples share a
micro-batch: with ``use_dynamic_bsz`` (``seqlen_balancing.rearrange_micro_batches``) it splits a
mini-batch into about ceil(tokens / max_token_len) micro-batches balanced by a workload estimate
(Karmarkar-Karp); :func:`best_fit_decreasing` instead fills fixed-size bins, so that every
micro-batch is close to the budget and packing efficiency is a direct metric.
"""

import bisect
import logging
from collections.abc import Sequence

logger = logging.getLogger(__name__)


def _check_lengths(lengths: Sequence[int], budget: int, truncate: bool) -> None:
    """Raise for empty samples, and for over-long ones unless truncating; errors name the sample index."""
    if budget < 1:
        raise ValueError(f"budget must be >= 1 token, got {budget}")
    for index, length in enumerate(lengths):
        if length < 1:
            raise ValueError(f"sample {index} has length {length}; every sample needs at least one token")
        if length > budget and not truncate:
            raise ValueError(
                f"sample {index} has {length} tokens, more than the micro-batch token budget of {budget}; "
                "raise the budget, filter the sample, or pass truncate=True to cut it to the budget"
            )


def _budgeted_sizes(lengths: Sequence[int], budget: int, truncate: bool) -> list[int]:
    """The tokens each sample takes in a bin: its length, cut to the budget when truncating."""
    _check_lengths(lengths, budget, truncate)
    num_truncated = sum(length > budget for length in lengths)
    if num_truncated:
        logger.warning("packing: truncated %d sample(s) to the %d-token budget", num_truncated, budget)
    return [min(length, budget) for length in lengths]


def best_fit_decreasing(lengths: Sequence[int], budget: int, *, truncate: bool = False) -> list[list[int]]:
    """Pack samples into bins of at most ``budget`` tokens, best-fit decreasing.

    Samples are placed longest first (ties by index, so the result is deterministic), each into the
    open bin with the *least* room that still fits it, or into a new bin. BFD uses at most
    11/9 OPT + 6/9 bins (Dosa 2007) and, on long-tailed lengths, fills almost every bin: the many
    short samples end up plugging the gaps left by the long ones.

    Args:
        lengths: tokens per sample.
        budget: token budget per micro-batch.
        truncate: cut samples longer than ``budget`` to ``budget`` tokens (they then fill a bin alone)
            instead of raising ``ValueError``.

    Returns:
        Bins of sample indices, in the order they were opened; within a bin, longest first.
    """
    sizes = _budgeted_sizes(lengths, budget, truncate)
    bins: list[list[int]] = []
    # (room left, bin index), sorted: the best fit is the first entry with room >= size.
    open_bins: list[tuple[int, int]] = []
    for index in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        size = sizes[index]
        position = bisect.bisect_left(open_bins, (size, -1))
        if position == len(open_bins):
            bins.append([index])
            room, bin_index = budget - size, len(bins) - 1
        else:
            room, bin_index = open_bins.pop(position)
            bins[bin_index].append(index)
            room -= size
        if room > 0:
            bisect.insort(open_bins, (room, bin_index))
    return bins


def pack_for_ranks(
    lengths: Sequence[int], budget: int, num_ranks: int, *, truncate: bool = False
) -> list[list[list[int]]]:
    """Split a global batch over ``num_ranks`` data-parallel ranks and pack each rank's share into bins.

    Returns ``rank_bins[r][j]``: the sample indices of micro-batch ``j`` on rank ``r``. Guarantees:

    - every sample is in exactly one bin, and no bin holds more than ``budget`` tokens;
    - every rank holds ``len(lengths) / num_ranks`` samples: verl hands each rank an equal,
      contiguous chunk of the batch (``chunk_tensordict`` asserts divisibility), so the batch laid
      out by :func:`rank_major_order` gives every rank exactly its own bins;
    - every rank has the same number of bins, none empty. Data-parallel ranks meet in FSDP's
      collectives once per micro-batch, so they must run equally many; the count is fixed here,
      where it shows in the packing efficiency, instead of by splitting bins at train time;
    - the ranks' token counts differ by at most the longest sample (checked on random batches in the
      tests), so no rank waits long for the others.

    How: samples are dealt out longest first, each to the rank with the fewest tokens among those
    still short of their sample count (greedy balancing under equal counts). Each rank's share is
    then packed best-fit decreasing, and a rank with fewer bins than the fullest rank splits its
    largest bins in two until the counts match. That is always possible: every rank holds at least
    as many samples as the fullest rank has bins. Within a rank, bins are ordered by tokens, most
    first, so that micro-batch j has similar work on every rank. On small batches checked
    exhaustively (tests), the bins per rank are the optimum or one more.

    With one rank this is :func:`best_fit_decreasing` (bins reordered). The number of bins per rank
    is at least ``ceil(tokens of the fullest rank / budget)``, so a batch of T tokens costs at
    least ``num_ranks * ceil(T / (num_ranks * budget))`` micro-batches in all: more ranks, more
    rounding.
    """
    if num_ranks < 1:
        raise ValueError(f"num_ranks must be >= 1, got {num_ranks}")
    if len(lengths) % num_ranks:
        raise ValueError(
            f"{len(lengths)} samples cannot be split evenly over {num_ranks} data-parallel ranks; "
            "make the samples per step (data.train_batch_size * rollout.n) a multiple of the rank count"
        )
    sizes = _budgeted_sizes(lengths, budget, truncate)
    shares = _equal_count_token_balanced_shares(sizes, num_ranks)
    rank_bins = [
        [[share[i] for i in bin_] for bin_ in best_fit_decreasing([sizes[i] for i in share], budget)]
        for share in shares
    ]
    bins_per_rank = max(len(bins) for bins in rank_bins)

    def tokens(bin_: list[int]) -> int:
        return sum(sizes[i] for i in bin_)

    for bins in rank_bins:
        while len(bins) < bins_per_rank:
            largest = max((b for b in bins if len(b) > 1), key=tokens)
            bins.remove(largest)
            bins.extend(_split_in_two(largest, sizes))
        bins.sort(key=lambda b: (-tokens(b), b))
    return rank_bins


def _equal_count_token_balanced_shares(sizes: Sequence[int], num_ranks: int) -> list[list[int]]:
    per_rank = len(sizes) // num_ranks
    shares: list[list[int]] = [[] for _ in range(num_ranks)]
    loads = [0] * num_ranks
    for index in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        rank = min((r for r in range(num_ranks) if len(shares[r]) < per_rank), key=lambda r: (loads[r], r))
        shares[rank].append(index)
        loads[rank] += sizes[index]
    return shares


def _split_in_two(bin_: list[int], sizes: Sequence[int]) -> list[list[int]]:
    """Two non-empty halves of a bin with balanced tokens (longest first into the lighter half)."""
    halves: list[list[int]] = [[], []]
    loads = [0, 0]
    for index in sorted(bin_, key=lambda i: (-sizes[i], i)):
        half = 0 if (loads[0], len(halves[0])) <= (loads[1], len(halves[1])) else 1
        halves[half].append(index)
        loads[half] += sizes[index]
    return halves


def rank_major_order(rank_bins: Sequence[Sequence[Sequence[int]]]) -> tuple[list[int], list[int]]:
    """The batch order that puts rank r's samples in the r-th equal chunk, and each position's micro-batch.

    Returns ``(order, micro_batch)``: the batch is reordered as ``samples[order]``; position p then
    belongs to micro-batch ``micro_batch[p]`` of its rank (micro-batch j of every rank has index j).
    """
    order, micro_batch = [], []
    for bins in rank_bins:
        for j, bin_ in enumerate(bins):
            order.extend(bin_)
            micro_batch.extend([j] * len(bin_))
    return order, micro_batch


def packing_efficiency(lengths: Sequence[int], bins: Sequence[Sequence[int]], budget: int) -> float:
    """Real tokens / (number of bins x budget); samples longer than the budget count as ``budget`` tokens."""
    if not bins:
        return 0.0
    real_tokens = sum(min(lengths[i], budget) for bin_ in bins for i in bin_)
    return real_tokens / (len(bins) * budget)
