"""The CPU platform is selected on a CPU-only host, the plugin reaches fresh processes through
verl's entry point, registration failures are loud, resource shortfalls fail fast, and a missing
flash-attn makes NPD build the student with sdpa."""

import json
import logging
import subprocess
import sys
import textwrap

import pytest
from conftest import TOY_CONFIG, compose

from verl_npd.platform.resource_check import placement_shortfall


def run_python(code: str, timeout: float = 180, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    import os

    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=timeout, env=env
    )


def test_plain_import_of_verl_selects_the_cpu_platform():
    # A fresh interpreter that only imports verl: the plugin must arrive through the
    # `verl.plugins` entry point, exactly as in a Ray worker.
    result = run_python(
        """
        import json, torch, verl
        from verl.utils.device import get_device_name, get_nccl_backend, get_device_id, get_torch_device
        from verl.plugin.platform import get_platform
        dev = get_torch_device()
        dev.manual_seed(3); a = torch.rand(2)
        state = dev.get_rng_state(); b = torch.rand(2); dev.set_rng_state(state); c = torch.rand(2)
        free, total = dev.mem_get_info()
        print(json.dumps({
            "platform": type(get_platform()).__name__,
            "device": get_device_name(),
            "backend": get_nccl_backend(),
            "device_id": get_device_id(),
            "tensor_device": str(torch.zeros(1).to(get_device_id()).device),
            "rng_restored": torch.equal(b, c),
            "memory_sane": 0 < free <= total,
        }))
        """
    )
    assert result.returncode == 0, result.stderr
    facts = json.loads(result.stdout.strip().splitlines()[-1])
    assert facts == {
        "platform": "CpuPlatform",
        "device": "cpu",
        "backend": "gloo",
        "device_id": "cpu",
        "tensor_device": "cpu",
        "rng_restored": True,
        "memory_sane": True,
    }
    assert "verl-npd: registering" not in result.stderr, result.stderr


def test_fsdp2_engine_is_found_for_cpu_and_never_pins_memory():
    result = run_python(
        """
        import verl
        import verl.workers.engine
        from verl.workers.engine.base import EngineRegistry
        import sys
        engine = EngineRegistry.get_engine_cls("language_model", "fsdp2")
        module = sys.modules[engine.__module__]
        print(engine.__name__, module.CPUOffloadPolicy().pin_memory, module.CPUOffloadPolicy(pin_memory=True).pin_memory)
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-3:] == ["FSDPEngineWithLMHead", "False", "False"]


def test_gloo_process_group_initialises_on_cpu():
    result = run_python(
        """
        import os
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29671", RANK="0", WORLD_SIZE="1")
        import torch, torch.distributed as dist, verl
        from verl.utils.distributed import initialize_global_process_group_ray
        initialize_global_process_group_ray()
        t = torch.ones(3); dist.all_reduce(t)
        print(dist.get_backend(), t.tolist())
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "gloo [1.0, 1.0, 1.0]"


def test_registration_failure_is_logged_at_warning_with_the_exception(monkeypatch, caplog):
    import verl_npd.plugin as plugin

    monkeypatch.setattr(plugin, "REGISTRATION_MODULES", ("verl_npd.platform.cpu", "verl_npd.does_not_exist"))
    with caplog.at_level(logging.WARNING, logger="verl_npd"):
        results = plugin.register_all()
    assert results == {"verl_npd.platform.cpu": True, "verl_npd.does_not_exist": False}
    failures = [r for r in caplog.records if r.levelno >= logging.WARNING and "verl_npd.does_not_exist" in r.getMessage()]
    assert len(failures) == 1 and failures[0].exc_info is not None


@pytest.mark.parametrize(
    "bundles, cpus, gpus, free, fits",
    [
        ([2], 3, 1, [{"CPU": 6, "GPU": 2}], True),
        ([2], 3, 1, [{"CPU": 5, "GPU": 2}], False),  # 2 bundles x 3 CPUs = 6 > 5
        ([2], 3, 1, [{"CPU": 16, "GPU": 1}], False),
        ([1, 1], 3, 1, [{"CPU": 3, "GPU": 1}, {"CPU": 3, "GPU": 1}], True),  # one group per node
        ([2], 3, 1, [{"CPU": 3, "GPU": 1}, {"CPU": 3, "GPU": 1}], False),  # STRICT_PACK: one node
        ([1], 3, 0, [{"CPU": 3}], True),
    ],
)
def test_placement_shortfall_arithmetic(bundles, cpus, gpus, free, fits):
    assert (placement_shortfall(bundles, cpus, gpus, free) is None) == fits


def test_resource_shortfall_fails_fast_instead_of_hanging():
    # Without the patch, Ray would keep this placement group pending forever.
    result = run_python(
        """
        import ray, verl
        from verl.single_controller.ray.base import RayResourcePool
        ray.init(num_cpus=4, num_gpus=1, include_dashboard=False, log_to_driver=False)
        pool = RayResourcePool(process_on_nodes=[2], use_gpu=True, max_colocate_count=1, name_prefix="too_big")
        try:
            pool.get_placement_groups()
        except Exception as e:
            print(type(e).__name__, "::", e)
        """,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("ResourceShortfallError :: verl resource pool 'too_big' cannot be placed"), last
    assert "needs 2 CPU and 2 GPU" in last


def _compose(overrides):
    return compose(*TOY_CONFIG, overrides)


@pytest.mark.parametrize(
    "overrides, processes",
    [
        # trainer rank + its colocated rollout server + the teacher's server
        ([], 3),
        # two trainer ranks with a server each (TP 1), two teacher replicas
        (["trainer.n_gpus_per_node=2", "distillation.teacher_models.teacher_model.num_replicas=2"], 6),
        # a standalone rollout pool of 2 replicas adds their servers
        (["actor_rollout_ref.rollout.nnodes=1", "actor_rollout_ref.rollout.n_gpus_per_node=2"], 5),
        # a teacher served outside the job has no server process here
        (["npd.teacher.url=http://127.0.0.1:9/v1"], 2),
    ],
)
def test_every_computing_process_of_a_node_is_counted(overrides, processes):
    from verl_npd.platform.cpu_threads import compute_processes_per_node

    assert compute_processes_per_node(_compose(overrides)) == processes


def test_cores_are_shared_and_an_explicit_setting_wins_in_every_process():
    # A fresh process per case: share_cores writes the environment that Ray workers inherit.
    code = """
        import json, os, sys, torch
        from unittest import mock
        from verl_npd.platform import cpu_threads
        sys.path.insert(0, "tests")
        from test_platform import _compose
        config = _compose([])
        with mock.patch.object(cpu_threads, "node_cores", return_value=8):
            cpu_threads.share_cores(config)
        print(json.dumps([os.environ["VERL_NPD_CPU_THREADS"], os.environ["OMP_WAIT_POLICY"], torch.get_num_threads()]))
    """
    import os

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    clean = {k: v for k, v in os.environ.items() if k not in ("VERL_NPD_CPU_THREADS", "OMP_WAIT_POLICY")}
    auto = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, cwd=repo, env=clean)
    assert auto.returncode == 0, auto.stderr
    # 8 cores over trainer, student server and teacher server.
    assert json.loads(auto.stdout.splitlines()[-1]) == ["2", "PASSIVE", 2]
    explicit = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, cwd=repo,
        env={**clean, "VERL_NPD_CPU_THREADS": "1"},
    )
    assert explicit.returncode == 0, explicit.stderr
    assert json.loads(explicit.stdout.splitlines()[-1]) == ["1", "PASSIVE", 1]
    # A fresh process that only imports verl (a Ray worker) applies the setting through the platform.
    worker = run_python("import torch, verl; print(torch.get_num_threads())", env_extra={"VERL_NPD_CPU_THREADS": "1"})
    assert worker.stdout.split()[-1] == "1", worker.stderr


def test_without_flash_attn_the_student_is_built_with_sdpa_and_one_warning(monkeypatch, toy_world):
    """verl builds the student with flash_attention_2 unless the config names another
    (verl/workers/config/model.py:185); flash-attn is not installed here, as on a GPU machine where
    its second install step was skipped."""
    from omegaconf import OmegaConf

    from verl_npd.platform import gpu_stack

    key = "actor_rollout_ref.model.override_config.attn_implementation"
    config = compose(*TOY_CONFIG, [f"~{key}"])
    assert OmegaConf.select(config, key) is None and not gpu_stack.module_installed("flash_attn")
    warning = gpu_stack.use_sdpa_without_flash_attn(config)
    assert warning.startswith(f"flash-attn is not installed: the student is built with {key}=sdpa")
    assert OmegaConf.select(config, key) == "sdpa"
    assert gpu_stack.use_sdpa_without_flash_attn(config) is None  # warned once: the config now names it
    # A config that names its attention keeps it, and with flash-attn installed nothing changes.
    named = compose(*TOY_CONFIG, [f"{key}=eager"])
    assert gpu_stack.use_sdpa_without_flash_attn(named) is None and OmegaConf.select(named, key) == "eager"
    monkeypatch.setattr(gpu_stack, "module_installed", lambda name: True)
    unnamed = compose(*TOY_CONFIG, [f"~{key}"])
    assert gpu_stack.use_sdpa_without_flash_attn(unnamed) is None and OmegaConf.select(unnamed, key) is None
