"""Registers verl-npd's sample filters; run by :mod:`verl_npd.plugin` in every process at ``import verl``.

verl 0.9.1 has no sample-filter registry (see :mod:`verl_npd.filters` for why), so this fills
ours. Cheap and idempotent: it stores an import path, and re-registering the same path is a no-op.
"""

from verl_npd.filters import register_sample_filter


def register() -> None:
    register_sample_filter("delta_ifd", "verl_npd.filters.delta_ifd:DeltaIFDFilter")
