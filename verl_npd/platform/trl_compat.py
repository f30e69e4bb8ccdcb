"""Let verl build models beside a TRL that no longer has ``AutoModelForCausalLMWithValueHead``.

verl/models/transformers/monkey_patch.py:352 (``apply_monkey_patch``, run on every model an FSDP
engine builds) asks ``is_trl_available()`` and, when TRL is installed, imports that class from
``trl.experimental.ppo`` or ``trl`` to replace its ``state_dict``. TRL 1.13 and later have it in
neither place, so every worker failed at start with an ImportError. Without the class there is
nothing to patch: we rebind that module's own ``is_trl_available`` (it is used nowhere else in the
module) to also require the class. Where the class imports, the answer is verl's;
verl/utils/model.py:654-664 (loading a value-head critic) keeps verl's ``is_trl_available`` and
still fails loudly on the missing class.
"""

from __future__ import annotations

import functools

from verl_npd.platform.verl_version import apply_once_when_imported


def _patch_is_trl_available(monkey_patch) -> None:
    trl_installed = monkey_patch.is_trl_available

    @functools.cache
    def is_trl_available() -> bool:
        if not trl_installed():
            return False
        try:
            from trl.experimental.ppo import AutoModelForCausalLMWithValueHead  # noqa: F401
        except ImportError:
            try:
                from trl import AutoModelForCausalLMWithValueHead  # noqa: F401
            except ImportError:
                return False
        return True

    monkey_patch.is_trl_available = is_trl_available


def register() -> None:
    """Changes verl only where it would fail: the class imports, so the answer is verl's."""
    apply_once_when_imported("trl_without_value_head", "verl.models.transformers.monkey_patch", _patch_is_trl_available)
