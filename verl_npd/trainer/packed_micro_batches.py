"""verl's engines train the micro-batches :mod:`verl_npd.trainer.packing` packed, not their own.

verl's engines split a mini-batch with ``prepare_micro_batches`` (verl/workers/engine/utils.py:92),
whose dynamic-batch path re-partitions the samples itself (Karmarkar-Karp balancing,
verl/utils/seqlen_balancing.py:348). NPD packs each data-parallel rank's share best-fit decreasing
into fixed token budgets (``pack_for_ranks``) and reports the resulting efficiency, so when a batch
carries the ``npd_micro_batch`` tensor (the micro-batch of each sample within its rank's chunk,
set by the NPD trainer) the patched function uses that assignment instead; everything else (nested
tensors, remove-padding forward, loss normalisation) is verl's. A batch without the tensor, which
is every batch verl's own trainers build, goes to verl's function unchanged.
"""

from __future__ import annotations

import functools

from verl_npd.platform.verl_version import apply_once_when_imported

# Per-sample tensor naming the packed micro-batch each sample belongs to; set by the NPD trainer.
MICRO_BATCH_KEY = "npd_micro_batch"


def micro_batches_from_assignment(data, dp_group):
    """``prepare_micro_batches``'s result for a batch carrying ``MICRO_BATCH_KEY``: one micro-batch per
    assigned index, in index order, each holding its samples in batch order; and their indices."""
    import torch
    import torch.distributed as dist
    from verl.utils import tensordict_utils as tu
    from verl.utils.device import get_device_name

    assignment = data[MICRO_BATCH_KEY].tolist()
    groups: dict[int, list[int]] = {}
    for index, micro_batch in enumerate(assignment):
        groups.setdefault(micro_batch, []).append(index)
    partitions = [groups[k] for k in sorted(groups)]
    if dp_group is not None and dist.is_initialized():
        # Every data-parallel rank must run the same number of micro-batches (FSDP's collectives
        # pair up per micro-batch); the trainer packs them so (trainer/packing.py pack_for_ranks).
        # A mismatch would hang in the first unpaired collective, so fail here instead.
        counts = torch.tensor([len(partitions), -len(partitions)], device=get_device_name())
        dist.all_reduce(counts, op=dist.ReduceOp.MAX, group=dp_group)
        most, fewest = int(counts[0]), -int(counts[1])
        if most != fewest:
            raise RuntimeError(
                f"verl-npd: the data-parallel ranks were given between {fewest} and {most} micro-batches "
                f"(this rank {len(partitions)}); each rank's '{MICRO_BATCH_KEY}' assignment must have the same count"
            )
    return [tu.index_select_tensor_dict(data, p) for p in partitions], partitions


def _patch_prepare_micro_batches(engine_utils) -> None:
    original = engine_utils.prepare_micro_batches

    @functools.wraps(original)
    def prepare_micro_batches(data, dp_group=None, *args, **kwargs):
        if MICRO_BATCH_KEY not in data.keys():
            return original(data, dp_group, *args, **kwargs)
        return micro_batches_from_assignment(data, dp_group)

    engine_utils.prepare_micro_batches = prepare_micro_batches


def register() -> None:
    """Patch ``prepare_micro_batches`` as soon as its module is imported, before any engine binds it:
    verl/workers/engine/fsdp/transformer_impl.py:82 imports the function by name."""
    apply_once_when_imported("packed_micro_batches", "verl.workers.engine.utils", _patch_prepare_micro_batches)
