"""``main_npd`` across a Ray cluster of 2 nodes started on this machine (``ray start --head`` and
``ray start --address``, each with logical GPUs of its own): 2 trainer ranks, one per node, and a
standalone rollout pool of 2 replicas synced through ``npd_gloo``. One on-policy run that improves
the student and checkpoints, then a short resume from its last checkpoint."""

import json
from collections import Counter

import pytest

from conftest import RAY_ENV, ray_cluster, read_jsonl, run_module, run_on_policy

STEPS = 8
VAL_PROMPTS = 256
BUDGET = 512  # actor_rollout_ref.actor.ppo_max_token_len_per_gpu of the default config


def test_two_nodes_two_trainer_ranks_two_standalone_replicas(toy_world, tmp_path):
    from ray.util.state import list_actors, list_tasks

    out, checkpoints = tmp_path / "run", tmp_path / "ckpt"
    cluster = [
        "trainer.nnodes=2",
        "trainer.n_gpus_per_node=1",
        "actor_rollout_ref.rollout.nnodes=1",
        "actor_rollout_ref.rollout.n_gpus_per_node=2",
        "actor_rollout_ref.rollout.checkpoint_engine.backend=npd_gloo",
        # Joining a running cluster: its nodes bring the resources.
        "ray_kwargs.ray_init.num_cpus=null",
        "ray_kwargs.ray_init.num_gpus=null",
        "data.train_batch_size=64",
        f"data.val_max_samples={VAL_PROMPTS}",
        f"trainer.default_local_dir={checkpoints}",
    ]
    # Two equal nodes: Ray places the trainer's two one-GPU placement groups on different nodes
    # (checked below); the teacher and the two standalone replicas (1 GPU each) go where there is room.
    with ray_cluster([(10, 3), (10, 3)]) as (address, dashboard):
        env = {**RAY_ENV, "RAY_ADDRESS": address}
        history = run_on_policy(
            out,
            [*cluster, f"trainer.test_freq={STEPS}", f"trainer.save_freq={STEPS // 2}"],
            env=env,
            steps=STEPS,
        )
        summary = json.loads((out / "summary.json").read_text())
        actors = list_actors(address=dashboard, detail=True, limit=10_000, raise_on_missing_output=False)
        generate_calls = Counter(
            task.actor_id
            for task in list_tasks(
                address=dashboard, filters=[("func_or_class_name", "=", "CPURolloutServer.generate")],
                limit=10_000, raise_on_missing_output=False,
            )
        )
        # A short resume from the last checkpoint (step STEPS): one more step, same cluster.
        resumed = run_module(
            "verl_npd.main_npd",
            [*cluster, f"npd.output_dir={out}", f"trainer.total_training_steps={STEPS + 1}", "trainer.test_freq=-1",
             "npd.sync_interval=1", "npd.buffer.max_staleness=0", "trainer.logger=[console]"],
            env=env,
        )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]

    # The trainer's two FSDP ranks ran on different nodes.
    trainer_ranks = [a for a in actors if a.class_name.endswith("WorkerDict")]
    assert len(trainer_ranks) == 2 and len({a.node_id for a in trainer_ranks}) == 2, trainer_ranks

    # Both standalone replicas generated the training samples (ranks 2 and 3: they follow the 2
    # colocated ones, which only validate; Ray's task records, which may miss the last few calls
    # of an actor, count hundreds each) ...
    servers = {a.name: a.actor_id for a in actors if a.class_name == "CPURolloutServer"}
    for name in ("npd_cpu_server_2_0", "npd_cpu_server_3_0"):
        assert generate_calls[servers[name]] > STEPS, (name, generate_calls)
    for row in history:
        # ... every sample of step t came from the weights of step t - 1 by its server's own report
        # (run_on_policy checks it; the load balancer spreads each step's 64 concurrent requests over
        # both replicas), so every sync reached both; and right after each sync, the
        # replicas' log-probs of the samples they generated are the trainer's (a reference run:
        # |drift| ~ 3e-8 per step; one stale step gives ~1e-2).
        assert abs(row["npd/drift_kl"]) < 1e-5, row["npd/drift_kl"]
        # Both ranks ran the same number of micro-batches; the fill counts all of them.
        assert row["npd/micro_batches"] == 2 * row["npd/micro_batches_per_rank"]
        assert row["npd/packing_efficiency"] == pytest.approx(
            row["perf/train_tokens"] / (row["npd/micro_batches"] * BUDGET)
        )

    # The student improved: greedy accuracy on the same validation prompts (a reference run: 0.29 -> 0.41).
    assert summary["student_accuracy_after"] >= summary["student_accuracy_before"] + 0.04, summary

    # The resume loaded both ranks' shards: before its one step, it validates the student of step
    # STEPS exactly as the first run did (greedy; at most one prompt may flip on a near tie).
    resumed_summary = json.loads((out / "summary.json").read_text())
    assert resumed_summary["steps"] == 1 and resumed_summary["validations"][0]["step"] == STEPS, resumed_summary
    assert abs(resumed_summary["student_accuracy_before"] - summary["student_accuracy_after"]) <= 1 / VAL_PROMPTS
    assert [row["step"] for row in read_jsonl(out / "metrics.jsonl")] == list(range(1, STEPS + 2))
