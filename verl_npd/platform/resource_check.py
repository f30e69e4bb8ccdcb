"""Fail fast, with a message, when verl asks Ray for a resource pool the cluster cannot hold.

verl/single_controller/ray/base.py:160 (``RayResourcePool.get_placement_groups``) blocks on
``ray.get([pg.ready() ...])`` with no timeout. When the cluster lacks the GPUs or CPUs (each bundle
asks for ``max_colocate_count`` CPUs, 3 by default), Ray keeps the request pending forever and the
run hangs silently. The patch checks the request against Ray's free resources first; a request
that fits goes to verl's function unchanged.
"""

from __future__ import annotations

import functools

from verl_npd.platform.verl_version import apply_once_when_imported


class ResourceShortfallError(RuntimeError):
    """The Ray cluster cannot hold a resource pool verl asked for."""


def placement_shortfall(
    bundles_per_node: list[int], cpus_per_bundle: float, gpus_per_bundle: float, free_per_node: list[dict]
) -> str | None:
    """Describe why STRICT_PACK placement groups cannot be placed now, or return None if they can.

    Each entry of ``bundles_per_node`` is one placement group that must fit on a single node
    (verl packs each node's workers with STRICT_PACK). Nodes are filled greedily, largest group
    first; that is exact for one node and a sound sufficient check for several.
    """
    free = [dict(node) for node in free_per_node]
    for count in sorted(bundles_per_node, reverse=True):
        need_cpu, need_gpu = count * cpus_per_bundle, count * gpus_per_bundle
        for node in free:
            if node.get("CPU", 0.0) >= need_cpu and node.get("GPU", 0.0) >= need_gpu:
                node["CPU"] = node.get("CPU", 0.0) - need_cpu
                node["GPU"] = node.get("GPU", 0.0) - need_gpu
                break
        else:
            have = ", ".join(f"{{CPU: {n.get('CPU', 0):g}, GPU: {n.get('GPU', 0):g}}}" for n in free_per_node)
            return (
                f"a placement group of {count} worker(s) needs {need_cpu:g} CPU and {need_gpu:g} GPU on one node, "
                f"but the free resources per node are [{have}]"
            )
    return None


def _patch_get_placement_groups(ray_base) -> None:
    import ray

    RayResourcePool = ray_base.RayResourcePool
    original = RayResourcePool.get_placement_groups

    @functools.wraps(original)
    def get_placement_groups(self, *args, **kwargs):
        if self.pgs is None:
            free = list(ray._private.state.available_resources_per_node().values())
            problem = placement_shortfall(
                list(self._store), float(self.max_colocate_count), 1.0 if self.use_gpu else 0.0, free
            )
            if problem is not None:
                raise ResourceShortfallError(
                    f"verl resource pool '{self.name_prefix}' cannot be placed: {problem}. Ask for fewer "
                    "workers or start Ray with more resources (on a CPU-only machine GPUs are logical: "
                    "+ray_kwargs.ray_init.num_gpus=N +ray_kwargs.ray_init.num_cpus=M)."
                )
        return original(self, *args, **kwargs)

    RayResourcePool.get_placement_groups = get_placement_groups


def register() -> None:
    """Changes verl only where it would hang: a request that fits reaches verl's function as before."""
    apply_once_when_imported("resource_fail_fast", "verl.single_controller.ray.base", _patch_get_placement_groups)
