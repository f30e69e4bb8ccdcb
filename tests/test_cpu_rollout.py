"""The ``npd_cpu`` rollout backend against plain transformers forwards, through Ray as verl drives it.

One server is launched the way verl's hybrid mode launches it (``CPURolloutReplica.init_hybrid``)
and shared by the tests. The hybrid-mode ``CPUServerAdapter`` runs in the test process, where a
trainer worker would hold it. The weight-update test restores the original weights when it is done.
"""

import asyncio
import time
from types import SimpleNamespace

import pytest
import ray
import torch
from tiny_models import EOS_TOKEN, build_tiny_qwen2, build_tiny_tokenizer

from verl.workers.config import CheckpointEngineConfig, RolloutConfig
from verl_npd.engines.cpu_engine import BatchedEngine, SamplingSpec, Sequence
from verl_npd.engines.cpu_server import CPURolloutReplica, CPUServerAdapter
from verl_npd.engines.cpu_server_registration import register

PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [40, 41], [100, 101, 102, 103, 104], [200], [17, 18, 19, 20, 21, 22]]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Two random tiny Qwen2 models (A serves, B is the 'trained' one) sharing one tokenizer."""
    dirs = {name: tmp_path_factory.mktemp(f"model_{name}") for name in ("a", "b")}
    tokenizer = build_tiny_tokenizer(dirs["a"])
    tokenizer.save_pretrained(str(dirs["b"]))
    eos = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    models = {
        name: build_tiny_qwen2(
            path, vocab_size=len(tokenizer), seed=seed, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id
        )
        for seed, (name, path) in enumerate(dirs.items())
    }
    return SimpleNamespace(dirs=dirs, models=models, eos=eos, vocab=len(tokenizer))


@pytest.fixture(scope="module")
def server(tiny):
    ray.init(num_cpus=2, include_dashboard=False)
    config = RolloutConfig(
        name="npd_cpu",
        tensor_model_parallel_size=1,
        prompt_length=64,
        response_length=32,
        load_format="auto",
        # 0 MB buckets: every tensor travels in its own update_weights call, exercising the streaming.
        checkpoint_engine=CheckpointEngineConfig(update_weights_bucket_megabytes=0),
    )
    model_config = {"_target_": "verl.workers.config.HFModelConfig", "path": str(tiny.dirs["a"])}
    replica = CPURolloutReplica(replica_rank=0, config=config, model_config=model_config, gpus_per_node=1)

    class NodeProbe:
        """Stands in for the replica's worker, which launch_servers only asks for its node.

        Local, so that Ray ships it by value (Ray's workers cannot import this test module); it
        imports nothing, so its process starts in a moment.
        """

    probe = ray.remote(NodeProbe).options(num_cpus=0).remote()
    asyncio.run(replica.init_hybrid(SimpleNamespace(workers=[probe])))
    # The hybrid-mode adapter, built as verl's trainer worker builds it (RayWorkerGroup sets RANK there).
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RANK", "0")
        adapter = CPUServerAdapter(config=config, model_config=model_config, device_mesh=None)
    yield SimpleNamespace(handle=replica.server_handle, adapter=adapter)
    ray.shutdown()


async def _hybrid_weight_sync(adapter, state_dict, global_steps):
    """What verl's ActorRolloutRefWorker.update_weights(mode="naive") does around the adapter."""
    await adapter.resume(tags=["weights"])
    await adapter.update_weights(iter(state_dict.items()), global_steps=global_steps)
    await adapter.resume(tags=["kv_cache"])


def _generate(server, prompts, **params):
    refs = [
        server.handle.generate.remote(p, dict(params), f"req-{time.monotonic_ns()}-{i}") for i, p in enumerate(prompts)
    ]
    return ray.get(refs)


def _stats(server):
    return ray.get(server.handle.get_engine_stats.remote())


@torch.no_grad()
def _forward_logprobs(model, ids):
    return model(torch.tensor([ids])).logits[0].float().log_softmax(-1)


def _response_logprobs(model, prompt, response):
    logprobs = _forward_logprobs(model, prompt + response)
    return [float(logprobs[len(prompt) - 1 + i, token]) for i, token in enumerate(response)]


def _greedy(model, prompt, max_tokens, eos):
    ids = list(prompt)
    for _ in range(max_tokens):
        ids.append(int(_forward_logprobs(model, ids)[-1].argmax()))
        if ids[-1] == eos:
            break
    return ids[len(prompt) :]


def test_registered_with_verl():
    from verl.workers.config.distillation import DistillationTeacherModelConfig
    from verl.workers.rollout.base import get_rollout_class
    from verl.workers.rollout.replica import get_rollout_replica_class

    register()
    register()  # idempotent
    assert get_rollout_class("npd_cpu", "async") is CPUServerAdapter
    assert get_rollout_replica_class("npd_cpu") is CPURolloutReplica
    teacher = SimpleNamespace(inference=SimpleNamespace(name="npd_cpu"))
    DistillationTeacherModelConfig._validate_topk_logprobs(teacher, use_topk=True, topk=8)
    with pytest.raises(ValueError, match="topk must be specified"):
        DistillationTeacherModelConfig._validate_topk_logprobs(teacher, use_topk=True, topk=None)


def test_a_fresh_process_importing_the_server_first_registers_it():
    # As a Ray worker unpickling CPURolloutServer does: the server module's first verl import runs
    # the plugin, whose registration must not need the half-imported server module.
    import subprocess
    import sys

    code = (
        "import verl_npd.engines.cpu_server as server\n"
        "from verl.workers.rollout.base import get_rollout_class\n"
        "from verl.workers.rollout.replica import get_rollout_replica_class\n"
        "print(get_rollout_replica_class('npd_cpu') is server.CPURolloutReplica,"
        " get_rollout_class('npd_cpu') is server.CPUServerAdapter)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "True True"
    assert "verl-npd: registering" not in result.stderr, result.stderr


def test_sampled_logprobs_match_forward(server, tiny):
    # Different prompt lengths and max_tokens: rows are left padded and leave the batch at different steps.
    max_tokens = [9, 3, 12, 1, 6]
    params = {"temperature": 1.0, "logprobs": True, "ignore_eos": True}
    refs = [
        server.handle.generate.remote(p, dict(params, max_tokens=m), f"lp{i}")
        for i, (p, m) in enumerate(zip(PROMPTS, max_tokens))
    ]
    for prompt, limit, out in zip(PROMPTS, max_tokens, ray.get(refs)):
        assert out.stop_reason == "completed" and len(out.token_ids) == limit == len(out.log_probs)
        expected = _response_logprobs(tiny.models["a"], prompt, out.token_ids)
        torch.testing.assert_close(torch.tensor(out.log_probs), torch.tensor(expected), atol=1e-4, rtol=0)
        assert set(out.extra_fields) >= {"global_steps", "num_cached_tokens"}


def test_processed_logprobs_follow_temperature_and_top_k(server, tiny):
    # verl's default logprobs_mode is processed_logprobs: the distribution actually sampled from.
    (out,) = _generate(server, PROMPTS[:1], temperature=0.7, top_k=20, logprobs=True, max_tokens=8, ignore_eos=True)
    prompt = PROMPTS[0]
    with torch.no_grad():
        logits = tiny.models["a"](torch.tensor([prompt + out.token_ids])).logits[0].float() / 0.7
    for i, token in enumerate(out.token_ids):
        row = logits[len(prompt) - 1 + i]
        row = row.masked_fill(row < row.topk(20).values[-1], float("-inf")).log_softmax(-1)
        assert torch.isfinite(row[token])
        assert abs(float(row[token]) - out.log_probs[i]) < 1e-4


def test_greedy_matches_argmax_loop(server, tiny):
    outs = _generate(server, PROMPTS, temperature=0.0, max_tokens=12)
    for prompt, out in zip(PROMPTS, outs):
        assert out.token_ids == _greedy(tiny.models["a"], prompt, 12, tiny.eos)
        assert out.log_probs is None


def test_prompt_logprobs_vllm_layout(server, tiny):
    sequences = PROMPTS[:3]
    for k in (0, 4):
        outs = _generate(server, sequences, max_tokens=1, temperature=1.0, prompt_logprobs=k, detokenize=False)
        for seq, out in zip(sequences, outs):
            ids, values = out.extra_fields["prompt_ids"], out.extra_fields["prompt_logprobs"]
            # What verl's teacher loop checks before using them (teacher_model.py).
            assert torch.tensor(ids).shape == torch.tensor(values).shape == (len(seq), max(k, 1))
            assert ids[-1] == [0] * max(k, 1) and values[-1] == [0.0] * max(k, 1)
            reference = _forward_logprobs(tiny.models["a"], seq)[:-1]
            # The actual tokens' log-probs come with the top-k, as vLLM's prompt_logprobs gives both.
            actual = out.extra_fields["prompt_token_logprobs"]
            assert len(actual) == len(seq) and actual[-1] == 0.0
            torch.testing.assert_close(
                torch.tensor(actual[:-1]), reference.gather(1, torch.tensor(seq[1:]).unsqueeze(1)).squeeze(1), atol=1e-4, rtol=0
            )
            if k == 0:
                assert [row[0] for row in ids[:-1]] == seq[1:]
                expected = reference.gather(1, torch.tensor(seq[1:]).unsqueeze(1))
            else:
                expected, expected_ids = reference.topk(k, dim=-1)
                assert ids[:-1] == expected_ids.tolist()
            torch.testing.assert_close(torch.tensor(values[:-1]), expected, atol=1e-4, rtol=0)


def test_top_k_1_and_tiny_top_p_are_greedy(server):
    greedy = [out.token_ids for out in _generate(server, PROMPTS, temperature=0.0, max_tokens=8)]
    top_k_1 = _generate(server, PROMPTS, temperature=1.0, top_k=1, max_tokens=8, logprobs=True)
    tiny_top_p = _generate(server, PROMPTS, temperature=1.0, top_p=1e-6, max_tokens=8)
    assert [out.token_ids for out in top_k_1] == greedy
    assert [out.token_ids for out in tiny_top_p] == greedy
    # Processed log-probs of a one-token distribution are log(1).
    assert all(lp == 0.0 for out in top_k_1 for lp in out.log_probs)


def test_seeded_sampling_is_reproducible(server):
    params = dict(temperature=1.0, max_tokens=10, ignore_eos=True)
    (alone,) = _generate(server, PROMPTS[:1], seed=1234, **params)
    # Same seed again, now batched with unseeded requests: a seeded row draws from its own generator.
    refs = [server.handle.generate.remote(PROMPTS[0], dict(params, seed=1234), "seeded-again")]
    refs += [server.handle.generate.remote(p, dict(params), f"noise{i}") for i, p in enumerate(PROMPTS)]
    batched = ray.get(refs)[0]
    (other_seed,) = _generate(server, PROMPTS[:1], seed=4321, **params)
    assert batched.token_ids == alone.token_ids
    assert other_seed.token_ids != alone.token_ids


def test_concurrent_requests_share_forward_passes(server):
    n = 8
    # Hold requests at the closed gate, then release them together: the engine must batch them.
    ray.get(server.handle.abort_all_requests.remote())
    params = {"max_tokens": 4, "ignore_eos": True}
    refs = [server.handle.generate.remote(PROMPTS[i % len(PROMPTS)], dict(params), f"b{i}") for i in range(n)]
    assert ray.wait(refs, num_returns=1, timeout=0.5)[0] == []
    before = _stats(server)
    ray.get(server.handle.resume_generation.remote())
    outs = ray.get(refs)
    after = _stats(server)
    assert all(out.stop_reason == "completed" and len(out.token_ids) == 4 for out in outs)
    assert after["prefill_batches"] - before["prefill_batches"] < n
    assert after["forward_passes"] - before["forward_passes"] < n
    assert after["max_batch_size"] >= n


def test_abort_returns_partial_tokens_and_holds_new_requests(server):
    long_params = {"max_tokens": 440, "ignore_eos": True, "logprobs": True}
    before = _stats(server)["decode_steps"]
    running = [server.handle.generate.remote(p, dict(long_params), f"long{i}") for i, p in enumerate(PROMPTS[:4])]
    while _stats(server)["decode_steps"] < before + 3:
        time.sleep(0.005)
    result = ray.get(server.handle.abort_all_requests.remote())
    assert result["aborted_count"] == 4
    for out in ray.get(running):
        assert out.stop_reason == "aborted"
        assert 0 < len(out.token_ids) < 440 and len(out.log_probs) == len(out.token_ids)

    # Behind the closed gate a new request is held, not lost...
    # ignore_eos: what it samples depends on how many decode steps ran before the abort (a shared
    # generator), and an early end-of-turn token would stop it short of its 3 tokens.
    held = server.handle.generate.remote(PROMPTS[1], {"max_tokens": 3, "ignore_eos": True}, "held")
    assert ray.wait([held], timeout=0.5)[0] == []
    # ...unless the abort declared that no resume is coming soon: then it is refused at once.
    ray.get(server.handle.abort_all_requests.remote(reject_request=True))
    refused = ray.get(server.handle.generate.remote(PROMPTS[1], {"max_tokens": 3}, "refused"))
    assert refused.stop_reason == "aborted" and refused.token_ids == []
    ray.get(server.handle.resume_generation.remote())
    released = ray.get(held)
    assert released.stop_reason == "completed" and len(released.token_ids) == 3


def test_hybrid_weight_sync_and_sleep(server, tiny):
    state_b = {name: tensor.clone() for name, tensor in tiny.models["b"].state_dict().items()}
    state_a = {name: tensor.clone() for name, tensor in tiny.models["a"].state_dict().items()}
    # An unknown name is refused before anything is written.
    with pytest.raises(ray.exceptions.RayTaskError, match="match no parameter"):
        bad = [("model.embed_tokens.weight", state_b["model.embed_tokens.weight"]), ("nope", torch.zeros(1))]
        ray.get(server.handle.update_weights.remote(bad))

    # Hybrid mode: the trainer releases the rollout, training happens, then weights are synced.
    asyncio.run(server.adapter.release())
    asleep = server.handle.generate.remote(PROMPTS[0], {"temperature": 0.0, "max_tokens": 8}, "during-sleep")
    assert ray.wait([asleep], timeout=0.5)[0] == []
    try:
        asyncio.run(_hybrid_weight_sync(server.adapter, state_b, 7))
        # The request held during sleep is served after the wake-up, with the new weights.
        assert ray.get(asleep).token_ids == _greedy(tiny.models["b"], PROMPTS[0], 8, tiny.eos)
        outs = _generate(server, PROMPTS, temperature=0.0, max_tokens=8, logprobs=True)
        for prompt, out in zip(PROMPTS, outs):
            assert out.token_ids == _greedy(tiny.models["b"], prompt, 8, tiny.eos)
            expected = _response_logprobs(tiny.models["b"], prompt, out.token_ids)
            torch.testing.assert_close(torch.tensor(out.log_probs), torch.tensor(expected), atol=1e-4, rtol=0)
            assert out.extra_fields["global_steps"] == 7
    finally:
        ray.get(server.handle.update_weights.remote(list(state_a.items()), global_steps=None))


def test_a_sync_during_a_request_tags_it_with_both_versions_and_leaves_no_old_state(server, tiny):
    """A colocated replica keeps generating through NPD's weight syncs. A request running when one
    lands finishes on the new weights with the old ones' KV cache: the server reports the versions
    of its first and last tokens, and NPD tags the sample with the older and counts it as spanning
    the sync. npd_cpu has no prefix cache, so the state a request leaves behind is nothing: the
    same prompt sent after the sync is answered by the new weights alone, exactly."""
    from verl_npd.rollout.async_manager import behaviour_version
    from verl_npd.rollout.scoring import ServerPool

    weights = {name: {k: v.clone() for k, v in tiny.models[name].state_dict().items()} for name in ("a", "b")}
    # NPD's client for colocated replicas (ServerPool.generate), greedy so the answers are checkable.
    pool = ServerPool([server.handle], name="rollout", batched=True, timeout_s=120, max_retries=0)
    params = {"max_tokens": 440, "ignore_eos": True, "temperature": 0.0, "logprobs": True}

    async def scenario():
        await _hybrid_weight_sync(server.adapter, weights["a"], 3)
        before = (await server.handle.get_engine_stats.remote())["decode_steps"]
        running = asyncio.ensure_future(pool.generate("across", prompt_ids=PROMPTS[0], sampling_params=dict(params)))
        while (await server.handle.get_engine_stats.remote())["decode_steps"] < before + 3:
            await asyncio.sleep(0.005)
        # The sync lands between two engine steps while the request runs (0 MB buckets: one
        # update_weights call per tensor, loaded together with the last).
        await _hybrid_weight_sync(server.adapter, weights["b"], 4)
        across = await running
        after = await pool.generate("after", prompt_ids=PROMPTS[0], sampling_params=dict(params, max_tokens=8))
        return across, after

    try:
        across, after = asyncio.run(scenario())
    finally:
        ray.get(server.handle.update_weights.remote(list(weights["a"].items()), global_steps=None))
    assert len(across.token_ids) == 440
    assert across.token_ids[:3] == _greedy(tiny.models["a"], PROMPTS[0], 3, tiny.eos)
    assert (across.extra_fields["min_global_steps"], across.extra_fields["max_global_steps"]) == (3, 4)
    assert behaviour_version(across.extra_fields, reserved=3) == (3, True)
    # The sample after the sync: version 4 throughout, and model B's answer and log-probs exactly.
    assert behaviour_version(after.extra_fields, reserved=3) == (4, False)
    assert after.token_ids == _greedy(tiny.models["b"], PROMPTS[0], 8, tiny.eos)
    expected = _response_logprobs(tiny.models["b"], PROMPTS[0], after.token_ids)
    torch.testing.assert_close(torch.tensor(after.log_probs), torch.tensor(expected), atol=1e-4, rtol=0)


def test_engine_merges_late_arrivals_into_running_batch(tiny):
    # Arrivals join a running batch whose cache is shorter (B) or longer (C) than their prompt.
    engine = BatchedEngine(
        tiny.models["a"], eos_token_ids=[], max_num_seqs=8, max_num_batched_tokens=1024,
        logprobs_mode="raw_logprobs", seed=0,
    )
    seqs = [
        Sequence(name, prompt, SamplingSpec.from_request({"logprobs": True}, max_tokens=limit, vocab_size=tiny.vocab))
        for name, prompt, limit in (("a", PROMPTS[1], 10), ("b", PROMPTS[0], 6), ("c", PROMPTS[3], 8))
    ]
    arrivals = {0: [seqs[0]], 3: [seqs[1]], 5: [seqs[2]]}
    step = 0
    while any(seq.finish_reason is None for seq in seqs):
        engine.step(arrivals.get(step, []))
        step += 1
    assert engine.stats.max_batch_size == 3 and engine.stats.prefill_batches == 3
    for seq in seqs:
        expected = _response_logprobs(tiny.models["a"], seq.prompt_ids, seq.output_ids)
        torch.testing.assert_close(torch.tensor(seq.output_logprobs), torch.tensor(expected), atol=1e-4, rtol=0)


def test_engine_masks_ids_beyond_tokenizer_and_rejects_unsupported_params(tiny):
    # verl makes vLLM mask logits of ids >= len(tokenizer); the engine does the same.
    valid = tiny.vocab - 20
    engine = BatchedEngine(
        tiny.models["a"], eos_token_ids=[], max_num_seqs=8, max_num_batched_tokens=1024,
        logprobs_mode="raw_logprobs", seed=0, num_valid_tokens=valid,
    )
    spec = SamplingSpec.from_request({"logprobs": True, "prompt_logprobs": 3}, max_tokens=16, vocab_size=tiny.vocab)
    seq = Sequence("s", PROMPTS[0], spec)
    while not engine.step([seq] if not seq.output_ids else []):
        pass
    assert max(seq.output_ids) < valid and max(max(row) for row in seq.prompt_topk_ids) < valid
    with torch.no_grad():
        logits = tiny.models["a"](torch.tensor([PROMPTS[0] + seq.output_ids])).logits[0, :, :valid]
    expected = logits.log_softmax(-1)[len(PROMPTS[0]) - 1 : -1].gather(1, torch.tensor(seq.output_ids).unsqueeze(1))
    torch.testing.assert_close(torch.tensor(seq.output_logprobs), expected.squeeze(1), atol=1e-4, rtol=0)

    for params, message in (
        ({"repetition_penalty": 1.1}, "repetition_penalty=1.0"),
        ({"n": 2}, "n=1"),
        ({"logit_bias": {1: 2.0}}, "does not support sampling params"),
        ({"stop": ["x"]}, "does not detokenize"),
    ):
        with pytest.raises(ValueError, match=message):
            SamplingSpec.from_request(params, max_tokens=4, vocab_size=tiny.vocab)
    # Unset (None) and empty values are what vLLM's defaults look like, not errors.
    spec = SamplingSpec.from_request({"stop": [], "top_k": None, "seed": None, "n": 1}, max_tokens=4, vocab_size=9)
    assert spec.top_k == -1 and spec.seed is None


def _one_wave(server, tiny, batched: bool, wave_prompts: int):
    """Run one rollout-manager wave on the server (student and teacher alike) and return its samples."""
    from verl_npd.filters.delta_ifd import DeltaIFDFilter, DeltaIFDFilterConfig
    from verl_npd.rollout.async_manager import AsyncRolloutManager, PromptItem, PromptStream
    from verl_npd.rollout.buffer import NearPolicyBuffer
    from verl_npd.rollout.scoring import ServerPool

    def pool(name):
        return ServerPool([server.handle], name=name, batched=batched, timeout_s=60, max_retries=0)

    buffer = NearPolicyBuffer(capacity=64, max_staleness=0, batch_size=wave_prompts)
    student = pool("rollout")  # as the trainer wires colocated replicas: it generates and scores
    manager = AsyncRolloutManager(
        student_generation_client=student,
        student_scorer=student,
        teacher_scorers={"teacher": pool("teacher")},
        teacher_topk=4,
        buffer=buffer,
        sample_filter=DeltaIFDFilter(DeltaIFDFilterConfig(enabled=False)),
        prompt_fn=lambda position: PromptItem(position, PROMPTS[position % len(PROMPTS)], None, {}),
        stream=PromptStream(dataset_size=len(PROMPTS), seed=0),
        header_ids=[3, 4],
        samples_per_prompt=1,
        sampling_params={"temperature": 1.0, "top_p": 1.0, "top_k": -1, "max_tokens": 6},
        max_wave_prompts=wave_prompts,
        max_waves_in_flight=1,
        request_timeout_s=60,
        max_retries=0,
        seed=7,
    )
    version, granted = buffer.acquire(wave_prompts)
    asyncio.run(manager._run_wave(list(range(granted)), version, granted))
    return [s.payload for s in buffer.take(granted, trainer_version=0, timeout=1).samples]


def test_a_wave_scores_the_same_batched_or_one_request_per_sequence_with_the_fewest_calls(server, tiny):
    wave = 5
    before = _stats(server)
    batched = _one_wave(server, tiny, batched=True, wave_prompts=wave)
    after_batched = _stats(server)
    single = _one_wave(server, tiny, batched=False, wave_prompts=wave)
    after_single = _stats(server)

    # Batched: one generate per sample, and three prefill calls for the whole wave (the teacher's
    # prompt+response with top-k and actual tokens, the teacher's and the student's header+response).
    assert after_batched["generate_calls"] - before["generate_calls"] == wave
    assert after_batched["score_prompts_calls"] - before["score_prompts_calls"] == 3
    # One request per sequence: one generate per sample and per prefill, no batch calls.
    assert after_single["generate_calls"] - after_batched["generate_calls"] == wave * 4
    assert after_single["score_prompts_calls"] == after_batched["score_prompts_calls"]

    model = tiny.models["a"]
    for b, s in zip(sorted(batched, key=lambda g: g.prompt.position), sorted(single, key=lambda g: g.prompt.position)):
        # Per-sample seeds: the same responses whatever else shares the batch.
        assert b.response_ids == s.response_ids and len(b.response_ids) > 0
        sequence = b.prompt.prompt_ids + b.response_ids
        reference = _forward_logprobs(model, sequence)[:-1]
        expected_ids = reference.topk(4, dim=-1).indices
        assert torch.equal(b.teacher_topk_ids[:-1].long(), expected_ids)
        assert torch.equal(s.teacher_topk_ids[:-1].long(), expected_ids)
        torch.testing.assert_close(b.teacher_topk_log_probs, s.teacher_topk_log_probs, atol=1e-4, rtol=0)
        response_reference = _response_logprobs(model, b.prompt.prompt_ids, b.response_ids)
        unconditional_reference = _response_logprobs(model, [3, 4], b.response_ids)
        for got in (b, s):
            torch.testing.assert_close(torch.tensor(got.teacher_cond), torch.tensor(response_reference), atol=1e-4, rtol=0)
            for uncond in (got.teacher_uncond, got.behaviour_uncond):
                torch.testing.assert_close(
                    torch.tensor(uncond), torch.tensor(unconditional_reference), atol=1e-4, rtol=0
                )


def test_a_server_that_dies_mid_call_is_taken_out_and_its_work_goes_to_the_others(server):
    """A pool of the real server and one that dies with work in flight (a stand-in that holds every
    call until it is killed): the dead one's share of a wave, and a generation request that landed
    on it, are answered by the live one exactly as a pool of the live one alone answers them; the
    liveness check finds a server that died idle; with none left, the error names them, and the
    requests that start later get it too."""
    from verl_npd.rollout.scoring import RequestFailed, ServerPool, call_with_retries

    class Frozen:
        """Holds every call until it is killed. Local, so that Ray ships it by value."""

        async def score_prompts(self, *args, **kwargs):
            import asyncio

            await asyncio.sleep(3600)

        async def generate(self, *args, **kwargs):
            import asyncio

            await asyncio.sleep(3600)

    def frozen():
        return ray.remote(Frozen).options(num_cpus=0).remote()

    sequences = [PROMPTS[i % len(PROMPTS)] + [50 + i] for i in range(6)]
    params = {"max_tokens": 6, "temperature": 1.0, "logprobs": True, "seed": 11}

    async def alone():
        live = ServerPool([server.handle], name="teacher", batched=True, timeout_s=60, max_retries=0)
        return await live.score(sequences, 4), await live.generate("r", prompt_ids=PROMPTS[0], sampling_params=dict(params))

    async def with_a_dying_server(dying):
        pool = ServerPool([server.handle, dying], name="teacher", batched=True, timeout_s=60, max_retries=0,
                          labels=["live", "dying"])  # fmt: skip
        scoring = asyncio.ensure_future(pool.score(sequences, 4))
        await asyncio.sleep(1)
        ray.kill(dying)
        scores = await scoring
        assert pool.dead == ["dying"] and pool.moved == 3  # its half of the wave, sent again
        return scores

    async def a_request_on_a_dying_server(dying):
        pool = ServerPool([dying, server.handle], name="rollout", batched=True, timeout_s=60, max_retries=0)
        request = asyncio.ensure_future(pool.generate("r", prompt_ids=PROMPTS[0], sampling_params=dict(params)))
        await asyncio.sleep(1)
        ray.kill(dying)
        output = await request
        assert pool.dead == ["rollout server 0"] and pool.moved == 1 and pool.handles == [server.handle]
        return output

    expected_scores, expected_output = asyncio.run(alone())
    scores = asyncio.run(with_a_dying_server(frozen()))
    for got, want in zip(scores, expected_scores, strict=True):
        assert torch.equal(got.topk_ids, want.topk_ids)
        # Batched prefills of other neighbours: equal up to padding's rounding.
        torch.testing.assert_close(got.topk_log_probs, want.topk_log_probs, atol=1e-4, rtol=0)
        assert got.token_log_probs == pytest.approx(want.token_log_probs, abs=1e-4)
    output = asyncio.run(a_request_on_a_dying_server(frozen()))
    assert output.token_ids == expected_output.token_ids  # the same seed on the same weights

    idle = frozen()
    ray.kill(idle)
    pool = ServerPool([server.handle, idle], name="rollout", batched=True, timeout_s=60, max_retries=0, labels=["a", "b"])
    pool.check_alive(timeout_s=10)
    assert pool.dead == ["b"] and pool.moved == 0 and pool.handles == [server.handle]

    gone = [frozen(), frozen()]
    for handle in gone:
        ray.kill(handle)
    pool = ServerPool(gone, name="teacher 'x'", batched=True, timeout_s=60, max_retries=0, labels=["t0", "t1"])
    with pytest.raises(RequestFailed, match=r"every teacher 'x' server has died \((t0, t1|t1, t0)\)"):
        asyncio.run(pool.score(sequences, 4))
    # Requests that start after the last server was taken out get the same error, and it is not
    # retried (the race that once surfaced as a ZeroDivisionError in the round-robin).
    none_left = r"^every teacher 'x' server has died \((t0, t1|t1, t0)\)$"
    with pytest.raises(RequestFailed, match=none_left):
        asyncio.run(call_with_retries(
            lambda: pool.generate("r", prompt_ids=PROMPTS[0], sampling_params=dict(params)), "rollout request",
            timeout_s=60, max_retries=1))  # fmt: skip
    with pytest.raises(RequestFailed, match=none_left):
        asyncio.run(pool.score(sequences, 4))
    with pytest.raises(RequestFailed, match=none_left):
        pool.check_alive(timeout_s=10)
