"""Sample filters for NPD, and the small registry the NPD trainer looks them up in.

Why our own registry: verl 0.9.1 has no per-sample filter extension point. Its only filtering is
DAPO group filtering (``algorithm.filter_groups``), hard-coded in the v1 ``ReplayBuffer`` and
keyed on reward variance within a prompt group; ``trainer.v1.sampler.custom_sampler`` replaces the
whole replay buffer class (loaded by file path), which sees TransferQueue tags, not the teacher and
student log-probs that Δ-IFD needs, and would tie a filter to the buffer's private eviction logic.
The Δ-IFD filter needs IFD scores that only exist after the teacher scoring pass and the
unconditional prefills, so the NPD trainer calls it at that point, by name:

    flt = build_sample_filter(config.npd.filter)       # or get_sample_filter("delta_ifd")(cfg)
    decision = flt(teacher=..., behaviour=...)         # the IFDs named in flt.required_scores

Switching filtering off is ``npd.filter.enabled=false``: every sample is kept, metrics still flow.

Importing this package is cheap (no torch): registrations store a "module:attribute" path that
is imported on first lookup. Built-in filters are registered by
:mod:`verl_npd.filters.verl_registration`, which the verl plugin runs in every process.
"""

import importlib
from collections.abc import Mapping

DEFAULT_SAMPLE_FILTER = "delta_ifd"

_SAMPLE_FILTERS: dict[str, str] = {}


def register_sample_filter(name: str, target: str) -> None:
    """Register ``target`` ("package.module:Factory") under ``name``.

    Idempotent for the same target; registering a different target under a taken name is an
    error, so two plugins cannot silently replace each other's filter.
    """
    if ":" not in target:
        raise ValueError(f"sample filter target must look like 'package.module:Factory', got {target!r}")
    existing = _SAMPLE_FILTERS.get(name)
    if existing is not None and existing != target:
        raise ValueError(f"sample filter {name!r} is already registered as {existing!r}; refusing {target!r}")
    _SAMPLE_FILTERS[name] = target


def available_sample_filters() -> tuple[str, ...]:
    return tuple(sorted(_SAMPLE_FILTERS))


def get_sample_filter(name: str):
    """The factory registered under ``name``: called with a config, it returns the filter."""
    target = _SAMPLE_FILTERS.get(name)
    if target is None:
        raise KeyError(
            f"unknown sample filter {name!r}; registered: {list(available_sample_filters())} "
            "(built-ins are registered when verl loads the verl-npd plugin, i.e. on `import verl`)"
        )
    module_name, attribute = target.split(":", 1)
    return getattr(importlib.import_module(module_name), attribute)


def build_sample_filter(config: Mapping | None = None):
    """The filter named by ``config["name"]`` (default ``delta_ifd``), built from the other keys."""
    values = dict(config or {})
    return get_sample_filter(values.pop("name", DEFAULT_SAMPLE_FILTER))(values)
