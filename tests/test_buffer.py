"""The near-policy buffer: staleness bounds, on-policy limit, backpressure and accounting.

A producer thread plays the asynchronous generator and the test body plays the trainer, with the
same version arithmetic as the real trainer: step t trains with weights of version t-1 and the
rollout engine receives version t after step t when t % sync_interval == 0.
"""

import threading
import time

import pytest

from verl_npd.rollout.buffer import BufferClosed, NearPolicyBuffer, Sample


def run_pipeline(buffer: NearPolicyBuffer, steps: int, sync_interval: int, chunk: int, filter_every: int = 0):
    stop = threading.Event()
    errors = []

    def produce():
        i = 0
        try:
            while not stop.is_set():
                try:
                    version, granted = buffer.acquire(chunk, timeout=0.05)
                except TimeoutError:
                    continue
                # The filter rejects every filter_every-th sample generated.
                kept = [
                    Sample(uid=f"s{j}", version=version)
                    for j in range(i, i + granted)
                    if not (filter_every and j % filter_every == 0)
                ]
                i += granted
                buffer.put(kept, reserved=granted, filtered=granted - len(kept))
        except Exception as e:  # surfaced to the test body
            errors.append(e)

    producer = threading.Thread(target=produce, daemon=True)
    producer.start()
    staleness = []
    for t in range(1, steps + 1):
        batch = buffer.take(buffer.batch_size, trainer_version=t - 1, timeout=10)
        staleness.extend(batch.staleness)
        assert all(s.version <= t - 1 for s in batch.samples)
        time.sleep(0.002)  # "training"
        if t % sync_interval == 0:
            buffer.set_rollout_version(t)
    stop.set()
    producer.join(timeout=5)
    assert not errors, errors
    return staleness


@pytest.mark.parametrize("policy", ["wait", "drop"])
@pytest.mark.parametrize("sync_interval, max_staleness", [(1, 0), (2, 1), (2, 3), (4, 3)])
def test_staleness_never_exceeds_the_bound(policy, sync_interval, max_staleness):
    buffer = NearPolicyBuffer(capacity=24, max_staleness=max_staleness, batch_size=4, stale_policy=policy)
    staleness = run_pipeline(buffer, steps=30, sync_interval=sync_interval, chunk=2)
    assert len(staleness) == 30 * 4
    assert max(staleness) <= max_staleness
    if policy == "wait":
        assert buffer.counters.dropped_stale == 0


@pytest.mark.parametrize("sync_interval, max_staleness", [(1, 0), (2, 1), (4, 3)])
def test_wait_drops_nothing_when_the_filter_thins_every_wave(sync_interval, max_staleness):
    # Waves as large as a batch, an eighth of each filtered out: the last wave before a sync must
    # be cut to what the trainer still needs, or its surplus goes stale (40 of 64 per sync before).
    buffer = NearPolicyBuffer(capacity=64, max_staleness=max_staleness, batch_size=16, stale_policy="wait")
    staleness = run_pipeline(buffer, steps=24, sync_interval=sync_interval, chunk=16, filter_every=8)
    c = buffer.counters
    assert c.filtered > 0 and len(staleness) == 24 * 16
    assert max(staleness) <= max_staleness
    assert c.dropped_stale == 0
    assert c.generated - c.filtered == c.consumed + buffer.queued


def test_one_unit_is_granted_even_when_fewer_samples_would_be_fresh():
    # Four samples per prompt; the trainer still needs 2 at this version: one whole prompt is
    # granted (2 of its samples will go stale) instead of both sides waiting for each other.
    buffer = NearPolicyBuffer(capacity=32, max_staleness=0, batch_size=8, stale_policy="wait")
    buffer.acquire(8, unit=4)
    buffer.put([Sample(uid=str(i), version=0) for i in range(6)], reserved=8, filtered=2)
    assert buffer.acquire(8, unit=4) == (0, 4)
    assert buffer.in_flight == 4


def test_sync_every_step_with_zero_staleness_is_exactly_on_policy():
    buffer = NearPolicyBuffer(capacity=64, max_staleness=0, batch_size=8, stale_policy="wait")
    staleness = run_pipeline(buffer, steps=20, sync_interval=1, chunk=4)
    assert staleness == [0] * (20 * 8)
    assert buffer.counters.dropped_stale == 0


def test_generation_runs_ahead_when_staleness_allows_it():
    # With a bound of 3 and syncs every 2 steps, the producer may fill the buffer beyond one batch:
    # some samples are consumed one version late. That lag is the point of near-policy training.
    buffer = NearPolicyBuffer(capacity=32, max_staleness=3, batch_size=4, stale_policy="wait")
    staleness = run_pipeline(buffer, steps=30, sync_interval=2, chunk=2)
    assert max(staleness) >= 1


def test_backpressure_blocks_the_producer_and_drops_nothing():
    buffer = NearPolicyBuffer(capacity=8, max_staleness=10, batch_size=4, stale_policy="drop")
    assert buffer.acquire(8) == (0, 8)
    buffer.put([Sample(uid=str(i), version=0) for i in range(8)], reserved=8)
    with pytest.raises(TimeoutError):
        buffer.acquire(1, timeout=0.2)
    assert buffer.counters.producer_waits == 0  # a timed-out wait is not a completed one

    unblocked = threading.Event()

    def producer():
        buffer.acquire(4, timeout=10)
        unblocked.set()

    thread = threading.Thread(target=producer)
    thread.start()
    time.sleep(0.2)
    assert not unblocked.is_set(), "the producer must wait while the buffer is full"
    batch = buffer.take(4, trainer_version=0, timeout=1)
    thread.join(timeout=5)
    assert unblocked.is_set()
    assert [s.uid for s in batch.samples] == ["0", "1", "2", "3"]
    assert buffer.queued == 4 and buffer.in_flight == 4
    assert buffer.counters.producer_waits == 1 and buffer.counters.dropped_stale == 0


def test_drop_policy_drops_and_counts_stale_samples():
    buffer = NearPolicyBuffer(capacity=16, max_staleness=1, batch_size=2, stale_policy="drop")
    buffer.acquire(6)
    buffer.put([Sample(uid=f"old{i}", version=0) for i in range(4)], reserved=6, filtered=1)
    buffer.set_rollout_version(2)
    buffer.acquire(2)
    buffer.put([Sample(uid=f"new{i}", version=2) for i in range(2)], reserved=2)
    batch = buffer.take(2, trainer_version=2, timeout=1)  # version-0 samples have staleness 2 > 1
    assert [s.uid for s in batch.samples] == ["new0", "new1"]
    assert [s.uid for s in batch.dropped_stale] == [f"old{i}" for i in range(4)]
    c = buffer.counters
    assert (c.reserved, c.generated, c.filtered, c.released, c.consumed, c.dropped_stale) == (8, 7, 1, 1, 2, 4)
    assert c.generated - c.filtered == c.consumed + c.dropped_stale + buffer.queued


def test_accounting_invariant_holds_through_a_filtered_pipeline():
    buffer = NearPolicyBuffer(capacity=20, max_staleness=2, batch_size=4, stale_policy="drop")
    run_pipeline(buffer, steps=25, sync_interval=2, chunk=3, filter_every=2)
    c = buffer.counters
    assert c.filtered > 0
    assert c.generated - c.filtered == c.consumed + c.dropped_stale + buffer.queued
    assert c.reserved == c.generated + c.released + buffer.in_flight


def test_take_times_out_without_losing_what_it_had():
    buffer = NearPolicyBuffer(capacity=8, max_staleness=0, batch_size=4, stale_policy="wait")
    buffer.acquire(3)
    buffer.put([Sample(uid=str(i), version=0) for i in range(3)], reserved=3)
    with pytest.raises(TimeoutError):
        buffer.take(4, trainer_version=0, timeout=0.1)
    assert buffer.queued == 3
    assert [s.uid for s in buffer.snapshot()[0]] == ["0", "1", "2"]


def test_snapshot_and_restore_continue_the_accounting():
    buffer = NearPolicyBuffer(capacity=16, max_staleness=2, batch_size=2, stale_policy="wait")
    buffer.acquire(4)
    buffer.put([Sample(uid=f"a{i}", version=0, payload={"x": i}) for i in range(4)], reserved=4)
    buffer.take(2, trainer_version=0)
    buffer.acquire(2)  # in flight at checkpoint time: re-generated after resume
    samples, state = buffer.snapshot()

    resumed = NearPolicyBuffer(capacity=16, max_staleness=2, batch_size=2, stale_policy="wait")
    resumed.restore(samples, state)
    assert [s.uid for s in resumed.snapshot()[0]] == ["a2", "a3"]
    assert resumed.in_flight == 0
    c = resumed.counters
    assert (c.reserved, c.generated, c.consumed) == (4, 4, 2)
    assert resumed.take(2, trainer_version=1).staleness == [1, 1]


def test_close_wakes_waiters_with_a_clear_error():
    buffer = NearPolicyBuffer(capacity=4, max_staleness=0, batch_size=4, stale_policy="wait")
    result = {}

    def consumer():
        try:
            buffer.take(4, trainer_version=0)
        except Exception as e:
            result["error"] = e

    thread = threading.Thread(target=consumer)
    thread.start()
    time.sleep(0.1)
    buffer.close(RuntimeError("rollout worker died"))
    thread.join(timeout=5)
    assert "rollout worker died" in str(result["error"])


def test_a_failed_take_gives_back_all_it_met_and_a_stale_sample_is_dropped_once():
    buffer = NearPolicyBuffer(capacity=8, max_staleness=0, batch_size=4, stale_policy="drop")
    buffer.acquire(5)
    buffer.put([Sample(uid="stale", version=0)] + [Sample(uid=str(i), version=1) for i in range(3)], reserved=4)
    with pytest.raises(TimeoutError):
        buffer.take(4, trainer_version=1, timeout=0.1)  # takes 3, meets 1 stale, then waits for a 4th
    # A checkpoint taken now holds all four; the stale one is not yet counted (its step never ran).
    assert [s.uid for s in buffer.snapshot()[0]] == ["stale", "0", "1", "2"]
    c = buffer.counters
    assert (c.dropped_stale, c.consumed) == (0, 0)
    assert c.generated - c.filtered == c.consumed + c.dropped_stale + buffer.queued
    buffer.put([Sample(uid="3", version=1)], reserved=1)
    batch = buffer.take(4, trainer_version=1, timeout=1)
    assert [s.uid for s in batch.samples] == ["0", "1", "2", "3"]
    assert [s.uid for s in batch.dropped_stale] == ["stale"] and c.dropped_stale == 1
    threading.Timer(0.1, buffer.close).start()
    with pytest.raises(BufferClosed):
        buffer.take(4, trainer_version=1)  # a close ends a waiting take the same way
    assert c.generated - c.filtered == c.consumed + c.dropped_stale + buffer.queued


def test_capacity_smaller_than_a_batch_is_rejected():
    with pytest.raises(ValueError, match="capacity 2 cannot hold a batch of 4"):
        NearPolicyBuffer(capacity=2, max_staleness=0, batch_size=4)


@pytest.mark.parametrize("sync_interval, max_staleness", [(2, 2), (4, 4), (1, 1)])
def test_waves_sized_for_the_filter_fill_a_batch_and_stay_fresh(sync_interval, max_staleness):
    # The generator asks for a batch's worth of samples plus what the filter drops (a seventh more
    # when it keeps 7 of 8); counting in-flight samples at that rate, the buffer grants waves of
    # about that size instead of full ones followed by a small remainder.
    batch = 16
    buffer = NearPolicyBuffer(
        capacity=96, max_staleness=max_staleness, batch_size=batch, stale_policy="wait", expected_keep_fraction=7 / 8
    )
    grants = []
    stop = threading.Event()

    def produce():
        i = 0
        while not stop.is_set():
            wanted = -(-batch * 8 // 7)  # ceil(16 / (7/8)) = 19
            try:
                version, granted = buffer.acquire(wanted, timeout=0.05)
            except TimeoutError:
                continue
            grants.append(granted)
            kept = [Sample(uid=f"s{j}", version=version) for j in range(i, i + granted) if j % 8 != 0]
            i += granted
            buffer.put(kept, reserved=granted, filtered=granted - len(kept))

    producer = threading.Thread(target=produce, daemon=True)
    producer.start()
    staleness = []
    for t in range(1, 41):
        staleness += buffer.take(batch, trainer_version=t - 1, timeout=10).staleness
        if t % sync_interval == 0:
            buffer.set_rollout_version(t)
    stop.set()
    producer.join(timeout=5)
    assert max(staleness) <= max_staleness
    # A sync frees two batches, 32 / (7/8) = 36.6 samples: a full wave and a nearly full one, never a
    # small remainder (waves of one batch gave 16, 16 and then 4 or 5).
    assert min(grants[:-1]) >= 15, grants
    # A wave that keeps more than the expected 7/8 may leave a sample or two behind a sync.
    assert buffer.counters.dropped_stale <= 0.02 * buffer.counters.generated, buffer.counters

