"""A CPU platform for verl, so that verl's real trainer (Ray single controller, FSDP2 engine
workers, rollout replicas, teacher loop) runs on a machine with no accelerator.

verl 0.9.1 resolves its device through ``verl.plugin.platform.get_platform()``. Auto-detection
probes the registered platforms in registration order (nvidia, npu, rocm, then plugins) and falls
back to CUDA when none claims the host. Registering this platform last, and claiming the host only
when no accelerator is visible, makes it the automatic choice on CPU-only machines and inert on GPU
machines. ``VERL_PLATFORM=cpu`` forces it.

Two choices differ from a real accelerator and are deliberate:
- ``ray_resource_name()`` is ``"GPU"``: verl's ``ResourcePoolManager`` only counts GPU/NPU
  resources, so on CPU each worker holds one *logical* GPU, declared with
  ``ray.init(num_gpus=N)`` (``+ray_kwargs.ray_init.num_gpus=N`` in verl's config).
- ``current_device()`` returns ``"cpu"`` rather than an index, so that verl's many
  ``tensor.to(get_device_id())`` calls land on the CPU.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import shutil
import types
from typing import Any, Optional

PLATFORM_NAME = "cpu"

logger = logging.getLogger("verl_npd")


def accelerator_present() -> bool:
    """True when this host has an accelerator that one of verl's own platforms should drive."""
    import torch

    if torch.cuda.is_available() or shutil.which("nvidia-smi") is not None:
        return True
    if getattr(torch.version, "hip", None) is not None:
        return True
    return importlib.util.find_spec("torch_npu") is not None


class _CpuDeviceModule(types.ModuleType):
    """What verl expects of ``torch.<device>``, on the CPU.

    ``torch.cpu`` lacks the memory-management and RNG calls that verl makes on its device module
    (``empty_cache``, ``mem_get_info``, ``get_rng_state``, ...); on the CPU those are no-ops or map
    to the process-wide CPU generator. Everything else falls through to ``torch.cpu``.
    """

    def __init__(self) -> None:
        super().__init__("verl_npd_cpu_device")
        import torch

        self._torch = torch

    def __getattr__(self, name: str) -> Any:
        return getattr(self._torch.cpu, name)

    def current_device(self) -> str:
        return "cpu"

    def set_device(self, device: Any) -> None:
        return None

    def device_count(self) -> int:
        return 1

    def is_available(self) -> bool:
        return True

    def synchronize(self, device: Any = None) -> None:
        return None

    def empty_cache(self) -> None:
        return None

    def ipc_collect(self) -> None:
        return None

    def set_per_process_memory_fraction(self, fraction: float, device: Any = None) -> None:
        return None

    def reset_peak_memory_stats(self, device: Any = None) -> None:
        return None

    def memory_allocated(self, device: Any = None) -> int:
        return 0

    def memory_reserved(self, device: Any = None) -> int:
        return 0

    def max_memory_allocated(self, device: Any = None) -> int:
        return 0

    def max_memory_reserved(self, device: Any = None) -> int:
        return 0

    def mem_get_info(self, device: Any = None) -> tuple[int, int]:
        import psutil

        memory = psutil.virtual_memory()
        return memory.available, memory.total

    def get_device_name(self, device: Any = None) -> str:
        return "cpu"

    def manual_seed(self, seed: int) -> None:
        self._torch.manual_seed(seed)

    def manual_seed_all(self, seed: int) -> None:
        self._torch.manual_seed(seed)

    def get_rng_state(self, device: Any = None):
        return self._torch.get_rng_state()

    def set_rng_state(self, state, device: Any = None) -> None:
        self._torch.set_rng_state(state)


def _platform_class():
    """Build the platform class lazily: verl's platform base is only importable once verl is."""
    from verl.plugin.platform import PlatformBase

    class CpuPlatform(PlatformBase):
        """verl platform for hosts without an accelerator (gloo collectives, logical GPUs)."""

        def __init__(self) -> None:
            self._device_module = _CpuDeviceModule()

        @property
        def device_name(self) -> str:
            return "cpu"

        @property
        def vendor_name(self) -> str:
            return "cpu"

        @property
        def device_module(self) -> types.ModuleType:
            return self._device_module

        def is_available(self) -> bool:
            return True

        def is_platform_available(self, use_smi_check: bool = False) -> bool:
            return not accelerator_present()

        def current_device(self) -> str:  # verl annotates int; see the module docstring
            return "cpu"

        def device_count(self) -> int:
            return 1

        def set_device(self, device_index: int) -> None:
            return None

        def synchronize(self, device_index: Optional[int] = None) -> None:
            return None

        def manual_seed(self, seed: int) -> None:
            self._device_module.manual_seed(seed)

        def manual_seed_all(self, seed: int) -> None:
            self._device_module.manual_seed_all(seed)

        def set_allocator_settings(self, settings: str) -> None:
            return None

        def empty_cache(self) -> None:
            return None

        def get_device_capability(self, device_index: int = 0) -> tuple[Optional[int], Optional[int]]:
            return None, None

        def communication_backend_name(self) -> str:
            return "gloo"

        def visible_devices_envvar(self) -> str:
            # Ray sets it for actors holding a logical GPU; it means nothing on the CPU.
            return "CUDA_VISIBLE_DEVICES"

        @contextlib.contextmanager
        def nvtx_range(self, msg: str):
            yield

        def profiler_start(self) -> None:
            return None

        def profiler_stop(self) -> None:
            return None

        def ray_resource_name(self) -> str:
            return "GPU"

        def ray_noset_envvars(self) -> list[str]:
            return []

        def is_ipc_supported(self) -> bool:
            return False

        def cudart(self) -> Any:
            return None

    return CpuPlatform


def register() -> None:
    """Register the CPU platform with verl, and apply the CPU patches when it is the one in use."""
    from verl.plugin.platform import PlatformRegistry, get_platform

    if PlatformRegistry.get(PLATFORM_NAME) is None:
        PlatformRegistry.register(platform=PLATFORM_NAME)(_platform_class())

    if get_platform().device_name == "cpu":
        from verl_npd.platform.cpu_patches import apply_cpu_patches

        apply_cpu_patches()
        from verl_npd.platform.cpu_threads import apply_configured_threads

        apply_configured_threads()
