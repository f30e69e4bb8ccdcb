"""The ``npd_gloo`` checkpoint engine: the wire format between engines in threads, the registration
caveat in a fresh interpreter, and a real weight sync driven by verl's ``CheckpointEngineManager``
from an FSDP2 actor worker group to a standalone ``npd_cpu`` replica in separate Ray processes.
"""

import asyncio
import os
import socket
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import ray
import torch
from tiny_models import EOS_TOKEN, build_tiny_qwen2, build_tiny_tokenizer

from verl_npd.engines.gloo_checkpoint_engine import BACKEND, GlooCheckpointEngine

ENGINE_MODULE = "verl_npd.engines.gloo_checkpoint_engine"


# ---------------------------------------------------------------- engines in threads


def _wire_weights() -> dict[str, torch.Tensor]:
    """Mixed dtypes and layouts, several buckets of 64 KiB, one tensor chunked across three."""
    g = torch.Generator().manual_seed(0)
    return {
        "big": torch.randn(150, 300, generator=g),  # 176 KiB > bucket: three chunks
        "bf16": torch.randn(33, 7, generator=g).to(torch.bfloat16),
        "flags": torch.tensor([True, False, True]),
        "int64": torch.arange(5),
        "scalar": torch.tensor(3.5),
        "empty": torch.empty(0, 4),
        "transposed": torch.randn(8, 6, generator=g).t(),  # not contiguous
        "fp16": torch.randn(120, 100, generator=g).to(torch.float16),
        "last": torch.randn(100, 100, generator=g),
    }


class _Walked:
    """A weights iterator that records how far it was consumed."""

    def __init__(self, weights: dict[str, torch.Tensor]) -> None:
        self.items, self.consumed = list(weights.items()), 0

    def __iter__(self):
        for item in self.items:
            self.consumed += 1
            yield item


def _sync(engines, n_actor: int, global_steps: int, weights: dict[str, torch.Tensor]):
    """One sync as CheckpointEngineManager runs it, with every worker in its own thread."""
    metadata = [engine.prepare() for engine in engines]
    actor_kwargs, rollout_kwargs = GlooCheckpointEngine.build_topology(n_actor, len(engines) - n_actor, metadata)
    kwargs = [{k: v[i] for k, v in actor_kwargs.items()} for i in range(n_actor)]
    kwargs += [{k: v[i] for k, v in rollout_kwargs.items()} for i in range(len(engines) - n_actor)]
    walked = [_Walked(weights) for _ in range(n_actor)]

    async def transfer(i: int):
        if i < n_actor:
            return await engines[i].send_weights(iter(walked[i]), global_steps=global_steps)
        return [item async for item in engines[i].receive_weights(global_steps=global_steps)]

    with ThreadPoolExecutor(len(engines)) as pool:
        list(pool.map(lambda i: engines[i].init_process_group(**kwargs[i]), range(len(engines))))
        groups = [engine._group_state for engine in engines]
        results = list(pool.map(lambda i: asyncio.run(transfer(i)), range(len(engines))))
    for engine in engines:
        engine.finalize()
    return results, walked, groups


@pytest.mark.parametrize("rebuild_group", [True, False])
def test_wire_roundtrip_between_engines(rebuild_group):
    bucket = 64 << 10
    # Two actor ranks (the second only walks its weights) and two rollout workers.
    engines = [GlooCheckpointEngine(bucket, is_master=True, rebuild_group=rebuild_group)]
    engines += [GlooCheckpointEngine(bucket, rebuild_group=rebuild_group) for _ in range(3)]
    weights = _wire_weights()
    expected_bytes = sum(t.nbytes for t in weights.values())

    previous_groups = None
    for global_steps in (5, 6):
        results, walked, groups = _sync(engines, 2, global_steps, weights)
        metrics, idle_actor, *received = results
        assert idle_actor == {}
        assert [w.consumed for w in walked] == [len(weights)] * 2
        assert metrics[f"checkpoint_engine/{BACKEND}/mbytes"] == pytest.approx(expected_bytes / 2**20)
        # "big" fills two buckets and starts a third, which the small ones join until "fp16" spills over.
        assert metrics[f"checkpoint_engine/{BACKEND}/buckets"] == 4
        for engine, pairs in zip(engines[2:], received):
            assert [name for name, _ in pairs] == list(weights)
            for name, tensor in pairs:
                ref = weights[name]
                assert tensor.dtype == ref.dtype and tensor.shape == ref.shape, name
                assert torch.equal(tensor, ref), name
                # Owned memory: nothing aliases a bucket that the next one overwrites.
                assert tensor.untyped_storage().nbytes() == tensor.nbytes, name
            assert engine.received_global_steps == global_steps
        assert groups[1] is None  # the idle actor rank never joins
        assert [g.rank for g in groups if g is not None] == [0, 1, 2]
        assert len({g.group_id for g in groups if g is not None}) == 1
        if previous_groups is not None:
            same = groups == previous_groups
            assert same is (not rebuild_group)
        previous_groups = groups
        assert all(engine.rank is None for engine in engines)
        if rebuild_group:
            assert all(engine._group is None and engine._store is None for engine in engines)


def test_store_listens_on_loopback_only_on_one_node_and_rejects_empty_buckets():
    with pytest.raises(ValueError, match="update_weights_bucket_megabytes"):
        GlooCheckpointEngine(0)
    engine = GlooCheckpointEngine(1 << 20, is_master=True)
    endpoint = engine.prepare().master
    assert endpoint.ip == "127.0.0.1" and endpoint.port > 0
    with socket.create_connection((endpoint.ip, endpoint.port), timeout=5):
        pass
    node_ip = ray.util.get_node_ip_address().strip("[]")
    if node_ip not in ("127.0.0.1", "::1"):
        with pytest.raises(OSError):
            socket.create_connection((node_ip, endpoint.port), timeout=5).close()
    engine.finalize()


def test_reimport_from_verl_plugin_registers_the_engine(tmp_path):
    # A fresh interpreter imports the engine module first, as a Ray worker unpickling one of its
    # classes does. Its first verl import runs verl's module hooks and plugins, which (like
    # verl_npd.plugin) run the registration while the engine module is half-initialised.
    (tmp_path / "npd_gloo_probe.py").write_text(
        textwrap.dedent(
            f"""
            import importlib
            import sys
            HALF_INITIALISED = not hasattr(sys.modules["{ENGINE_MODULE}"], "GlooCheckpointEngine")
            importlib.import_module("{ENGINE_MODULE}_registration").register()
            """
        )
    )
    code = f"""
        import {ENGINE_MODULE} as module
        import npd_gloo_probe
        from verl.checkpoint_engine import CheckpointEngineRegistry
        from verl_npd.engines.gloo_checkpoint_engine_registration import register
        register()  # idempotent
        print(npd_gloo_probe.HALF_INITIALISED, CheckpointEngineRegistry.get("{BACKEND}") is module.GlooCheckpointEngine)
    """
    env = dict(os.environ, VERL_USE_EXTERNAL_MODULES="npd_gloo_probe")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tmp_path), env.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120, env=env
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "True True"
    assert "verl-npd: registering" not in result.stderr, result.stderr


# ---------------------------------------------------------------- verl's own flow, in Ray


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The trained model B on disk (the actor loads it) and its tokenizer; hidden 384 puts its MLP
    weights (1.1 MiB) over a 1 MiB bucket, so real FSDP weights travel in chunks too."""
    path = tmp_path_factory.mktemp("model_b")
    tokenizer = build_tiny_tokenizer(path)
    eos = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    model = build_tiny_qwen2(
        path, vocab_size=len(tokenizer), hidden=384, seed=1, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id
    )
    return path, model, eos


def _actor_rollout_ref_config(model_path):
    """verl's ppo_trainer config: FSDP2 actor only (hybrid_engine=False), npd_cpu rollout, npd_gloo sync."""
    import verl
    from hydra import compose, initialize_config_dir

    config_dir = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        config = compose(
            config_name="ppo_trainer",
            overrides=[
                f"actor_rollout_ref.model.path={model_path}",
                "+actor_rollout_ref.model.override_config.attn_implementation=sdpa",
                "actor_rollout_ref.hybrid_engine=False",
                "actor_rollout_ref.actor.strategy=fsdp2",
                "actor_rollout_ref.actor.ppo_mini_batch_size=2",
                "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=1",
                "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=1",
                "actor_rollout_ref.rollout.name=npd_cpu",
                # Random weights until the first sync, as vLLM's dummy format.
                "actor_rollout_ref.rollout.load_format=dummy",
                "actor_rollout_ref.rollout.prompt_length=32",
                "actor_rollout_ref.rollout.response_length=16",
                "actor_rollout_ref.rollout.tensor_model_parallel_size=1",
                "+actor_rollout_ref.rollout.engine_kwargs.npd_cpu.num_threads=1",
                f"actor_rollout_ref.rollout.checkpoint_engine.backend={BACKEND}",
                "actor_rollout_ref.rollout.checkpoint_engine.update_weights_bucket_megabytes=1",
                # Registers the engine in every worker even before verl_npd.plugin lists the module.
                f"actor_rollout_ref.rollout.checkpoint_engine.custom_backend_module={ENGINE_MODULE}",
            ],
        )
    return config.actor_rollout_ref


def _server_state(handle) -> dict[str, torch.Tensor]:
    return ray.get(
        handle.__ray_call__.remote(lambda server: {k: v.clone() for k, v in server._engine.model.state_dict().items()})
    )


@torch.no_grad()
def _greedy_with_logprobs(model, prompt, max_tokens, eos):
    ids, logprobs = list(prompt), []
    for _ in range(max_tokens):
        step = model(torch.tensor([ids])).logits[0, -1].float().log_softmax(-1)
        ids.append(int(step.argmax()))
        logprobs.append(float(step[ids[-1]]))
        if ids[-1] == eos:
            break
    return ids[len(prompt) :], logprobs


def test_manager_syncs_fsdp2_actor_into_standalone_npd_cpu_replica(tiny):
    from verl.checkpoint_engine import CheckpointEngineManager
    from verl.single_controller.ray import RayClassWithInitArgs, RayResourcePool, RayWorkerGroup
    from verl.utils.config import omega_conf_to_dataclass
    from verl.workers.engine_workers import ActorRolloutRefWorker

    from verl_npd.engines.cpu_server import CPURolloutReplica

    model_path, model_b, eos = tiny
    config = _actor_rollout_ref_config(model_path)
    state_b = model_b.state_dict()
    prompts = [[5, 6, 7, 8, 9], [40, 41, 42], [100]]

    def scramble(server) -> None:  # local, so that Ray ships it by value
        with torch.no_grad():
            for param in server._engine.model.parameters():
                param.normal_()

    ray.init(num_cpus=8, num_gpus=2, include_dashboard=False)
    try:
        # The FSDP2 actor (one logical GPU) and the standalone replica (the other) start together.
        actor_pool = RayResourcePool(process_on_nodes=[1], use_gpu=True, max_colocate_count=1, name_prefix="actor")
        actor_wg = RayWorkerGroup(
            resource_pool=actor_pool,
            ray_cls_with_init=RayClassWithInitArgs(cls=ray.remote(ActorRolloutRefWorker), config=config, role="actor"),
            device_name="cpu",
        )
        replica = CPURolloutReplica(replica_rank=0, config=config.rollout, model_config=config.model, gpus_per_node=1)
        with ThreadPoolExecutor(1) as pool:
            launch = pool.submit(asyncio.run, replica.init_standalone())
            actor_wg.init_model()
            launch.result()
        server = replica.server_handle
        manager = CheckpointEngineManager(
            config=omega_conf_to_dataclass(config.rollout.checkpoint_engine), actor_wg=actor_wg, replicas=[replica]
        )

        before = _server_state(server)
        assert not torch.equal(before["model.embed_tokens.weight"], state_b["model.embed_tokens.weight"])

        for global_steps in (3, 4):
            start = time.perf_counter()
            metrics = manager.update_weights(global_steps=global_steps)
            seconds = time.perf_counter() - start
            print(f"{BACKEND} sync {global_steps}: {seconds:.2f}s, {metrics}")

            # Everything FSDP2 exported (the tied lm_head too) arrived bit for bit, in many buckets.
            received = _server_state(server)
            assert received.keys() == state_b.keys()
            for name, tensor in state_b.items():
                assert torch.equal(received[name], tensor), name
            sent_bytes = metrics[f"checkpoint_engine/{BACKEND}/mbytes"] * 2**20
            assert sent_bytes == pytest.approx(sum(t.nbytes for t in state_b.values()), abs=0.5)
            assert metrics[f"checkpoint_engine/{BACKEND}/buckets"] > 10

            # The replica now serves model B, tagged with the version sent.
            greedy = {"temperature": 0.0, "max_tokens": 8, "logprobs": True}
            outputs = ray.get(
                [server.generate.remote(p, greedy, f"sync{global_steps}-{i}") for i, p in enumerate(prompts)]
            )
            for prompt, out in zip(prompts, outputs):
                tokens, logprobs = _greedy_with_logprobs(model_b, prompt, 8, eos)
                assert out.token_ids == tokens
                # The weights are bit-exact (above); what is left is the server's batched KV-cache
                # decode against one full forward, at the 1e-5 level.
                torch.testing.assert_close(torch.tensor(out.log_probs), torch.tensor(logprobs), atol=1e-4, rtol=0)
                assert out.extra_fields["global_steps"] == global_steps

            # Scramble the served weights: the next sync has to carry everything again.
            ray.get(server.__ray_call__.remote(scramble))
    finally:
        ray.shutdown()
