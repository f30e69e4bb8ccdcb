"""``npd_gloo``: a verl checkpoint engine that moves the actor's weights to rollout replicas over gloo.

verl's checkpoint engines for a rollout replica with resources of its own (standalone replicas,
separate-async training) all need an accelerator transport: ``nccl`` (cupy), ``hccl``, ``nixl``,
``mooncake``, ``kimi``; ``naive`` only works inside one process (hybrid mode). This engine does what
``verl/checkpoint_engine/nccl_checkpoint_engine.py`` does, on CPU::

    actor_rollout_ref.rollout.checkpoint_engine.backend=npd_gloo

Flow, as driven by ``CheckpointEngineManager.update_weights`` (verl/checkpoint_engine/base.py):

1. ``prepare`` on every actor and rollout worker. Actor rank 0 (``is_master``) opens the rendezvous:
   a ``TCPStore`` listening on a free port of loopback (one-node cluster) or of its node's IP
   (``ray.util.get_node_ip_address()``, several nodes), and nowhere else. Every worker reports its
   listen address and the group it still holds, if any.
2. ``build_topology`` (driver): actor rank 0 is group rank 0, the rollout workers are ranks
   1..R; every other actor rank gets -1 and stays out of the group, as in the nccl engine's
   single-sender mode. A group id names the rendezvous.
3. ``init_process_group``: ranks >= 0 build a ``ProcessGroupGloo`` (not c10d's default group, which
   the trainer and ``CheckpointEngineWorker`` already own) over that store, each binding gloo's
   sockets on the same kind of address (loopback, or its own node IP).
4. ``send_weights`` on the actor workers: rank 0 packs ``get_per_tensor_param()`` into buckets of at
   most ``update_weights_bucket_megabytes`` (a tensor larger than a bucket travels in bucket-sized
   chunks) and broadcasts each as a 3-int64 header and one uint8 payload: a JSON table of
   (name, shape, dtype, chunk) entries followed by the raw bytes. No tensor is pickled. Ranks -1
   still walk the generator to the end, because producing each full tensor is an all-gather over
   the actor group. ``receive_weights`` on the rollout workers yields ``(name, tensor)`` pairs
   rebuilt from the payload, each tensor owning its memory, which ``CheckpointEngineWorker`` feeds
   to the replica's server adapter (``CPUServerAdapter.update_weights`` for ``npd_cpu``).
   Broadcasts run on one background thread per engine, so the next bucket is on the wire while the
   current one is gathered (sender) or handed to the server (receiver).
5. ``finalize``: the group and the store are dropped (default ``rebuild_group=True``: building a gloo
   group on CPU costs milliseconds, and a fresh group follows replicas being added or removed).
   With ``rebuild_group=False`` the group and the store live on, and the next sync reuses them when
   every member still holds the same rank of the same group.

Options go under ``checkpoint_engine.engine_kwargs.npd_gloo``: ``rebuild_group`` (default True),
``timeout_s`` (gloo and store timeout, default 1800 as torch's).

Buckets are allocated when they are filled, at their actual size, not up front in ``prepare`` as the
nccl engine does: on CPU the bucket is host memory taken from the trainer, and verl's default bucket
is 2 GiB.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Optional

import ray
import torch
import torch.distributed as dist
from verl.checkpoint_engine.base import CheckpointEngine, CheckpointEngineRegistry
from verl.utils.net_utils import is_valid_ipv6_address
from verl.workers.rollout.utils import ensure_async_iterator

BACKEND = "npd_gloo"

logger = logging.getLogger(__name__)

# str(dtype) -> dtype, for every dtype torch defines ("torch.float32" -> torch.float32).
_DTYPES = {str(value): value for value in vars(torch).values() if isinstance(value, torch.dtype)}

# The bucket header: JSON table bytes, raw weight bytes, is-last flag.
_HEADER_FIELDS = 3


@dataclass(frozen=True)
class MasterEndpoint:
    """Where the group's store listens (actor rank 0's node), and the bucket size it sends with."""

    ip: str
    port: int
    bucket_size: int
    rebuild_group: bool


@dataclass(frozen=True)
class GroupState:
    """The group a worker holds after a sync when groups are kept alive: its id, rank and size."""

    group_id: str
    rank: int
    world_size: int


@dataclass(frozen=True)
class WorkerMetadata:
    """What ``prepare`` reports for ``build_topology``; only actor rank 0 fills ``master``.

    ``ip`` (the worker's listen address) is only logged: each rank binds gloo on its own.
    """

    ip: str
    group: Optional[GroupState] = None
    master: Optional[MasterEndpoint] = None


def _listen_ip() -> str:
    """Loopback while the Ray cluster is one node (nothing else must reach our sockets); the
    node's IP, which peers on other nodes can reach, once the cluster has several."""
    if ray.is_initialized() and sum(node["Alive"] for node in ray.nodes()) > 1:
        return ray.util.get_node_ip_address().strip("[]")
    return "127.0.0.1"


@CheckpointEngineRegistry.register(BACKEND)
class GlooCheckpointEngine(CheckpointEngine):
    """Broadcast the actor's full weights from actor rank 0 to every rollout worker over gloo (CPU).

    Args:
        bucket_size: most bytes broadcast at once (``update_weights_bucket_megabytes << 20``).
        is_master: True on actor rank 0, the only sender (verl's actor worker passes it).
        rebuild_group: drop the group in ``finalize`` and build a new one for every sync (default),
            or keep it for the next sync with the same members.
        timeout_s: timeout of the store connection and of each gloo operation.
    """

    def __init__(
        self,
        bucket_size: int,
        is_master: bool = False,
        rebuild_group: bool = True,
        timeout_s: float = 1800.0,
    ) -> None:
        if bucket_size <= 0:
            raise ValueError(
                f"{BACKEND} checkpoint engine needs a positive bucket size, got {bucket_size} bytes: "
                "set checkpoint_engine.update_weights_bucket_megabytes >= 1"
            )
        self.bucket_size = int(bucket_size)
        self.is_master = is_master
        self.rebuild_group = rebuild_group
        self.timeout = timedelta(seconds=timeout_s)

        self.rank: Optional[int] = None
        self.world_size: Optional[int] = None
        self._store: Optional[dist.Store] = None
        self._endpoint: Optional[MasterEndpoint] = None
        self._group: Optional[dist.ProcessGroupGloo] = None
        self._group_state: Optional[GroupState] = None
        # One thread per engine runs every gloo operation, so they reach the group in program order
        # while the event loop keeps gathering (sender) or feeding the server (receiver).
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=BACKEND)
        # The step the last received weights were sent for, as the sender reported it.
        self.received_global_steps: Optional[int] = None
        # A tensor larger than a bucket, being assembled from its chunks: (name, tensor).
        self._merging: Optional[tuple[str, torch.Tensor]] = None

    # ------------------------------------------------------------------ group lifecycle

    def prepare(self) -> WorkerMetadata:
        """Actor rank 0: open the store's listening socket (once when groups are kept). All: report."""
        master = None
        if self.is_master:
            if self.rebuild_group or self._store is None:
                self._drop_group()
                self._open_store()
            master = self._endpoint
        return WorkerMetadata(ip=_listen_ip(), group=self._group_state, master=master)

    def _open_store(self) -> None:
        """Host the rendezvous store on a free port of the listen address, bound to that address only."""
        ip = _listen_ip()
        family = socket.AF_INET6 if is_valid_ipv6_address(ip) else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.bind((ip, 0))
            port = sock.getsockname()[1]
        except BaseException:
            sock.close()
            raise
        # The store takes the bound socket over and closes it when it is destroyed. Handing it a
        # socket we bound is what keeps it off the other interfaces (given a port, it binds them all).
        self._store = dist.TCPStore(
            ip, port, None, True, self.timeout, wait_for_workers=False, master_listen_fd=sock.detach()
        )
        self._endpoint = MasterEndpoint(
            ip=ip, port=port, bucket_size=self.bucket_size, rebuild_group=self.rebuild_group
        )

    @classmethod
    def build_topology(
        cls, actor_wg_world_size: int, rollout_world_size: int, metadata: list[WorkerMetadata]
    ) -> tuple[dict[str, list[Any]], dict[str, list[Any]]]:
        """Actor rank 0 is group rank 0 and the rollout workers follow; other actor ranks get -1."""
        master = metadata[0].master
        assert master is not None, f"{BACKEND}: actor rank 0 must be the checkpoint engine master (is_master=True)"
        world_size = 1 + rollout_world_size
        actor_ranks = [0] + [-1] * (actor_wg_world_size - 1)
        rollout_ranks = list(range(1, world_size))

        # Reuse the standing group only if every member holds the same rank of it; else start over.
        standing = metadata[0].group
        members = [(info, rank) for info, rank in zip(metadata, actor_ranks + rollout_ranks) if rank >= 0]
        reuse = (
            not master.rebuild_group
            and standing is not None
            and all(info.group == GroupState(standing.group_id, rank, world_size) for info, rank in members)
        )
        group_id = standing.group_id if reuse else uuid.uuid4().hex
        logger.info(
            "%s build_topology: sender %s:%d, %d receivers on %s, group %s (%s)",
            BACKEND,
            master.ip,
            master.port,
            rollout_world_size,
            sorted({info.ip for info in metadata[actor_wg_world_size:]}),
            group_id,
            "kept" if reuse else "new",
        )

        def kwargs(ranks: list[int]) -> dict[str, list[Any]]:
            n = len(ranks)
            return {
                "rank": ranks,
                "world_size": [world_size] * n,
                "master_metadata": [master] * n,
                "group_id": [group_id] * n,
            }

        return kwargs(actor_ranks), kwargs(rollout_ranks)

    def init_process_group(self, rank: int, world_size: int, master_metadata: MasterEndpoint, group_id: str) -> None:
        """Join group ``group_id`` as ``rank`` (rank -1: an actor worker that only walks its weights)."""
        self.rank, self.world_size = rank, world_size
        if rank < 0:
            self._drop_group()
            return
        if self._group is not None and self._group_state == GroupState(group_id, rank, world_size):
            return
        self._drop_group()
        if rank > 0:
            # The sender's settings rule the group.
            self.bucket_size = master_metadata.bucket_size
            self.rebuild_group = master_metadata.rebuild_group
            if self._store is None or self._endpoint != master_metadata:
                self._store = dist.TCPStore(
                    master_metadata.ip, master_metadata.port, None, False, self.timeout, wait_for_workers=False
                )
                self._endpoint = master_metadata
        assert self._store is not None, f"{BACKEND}: prepare() must run on the master before init_process_group()"

        options = dist.ProcessGroupGloo._Options()
        options._timeout = self.timeout
        # Gloo's sockets bind the listen address, which the peers can reach.
        options._devices = [dist.ProcessGroupGloo.create_device(hostname=_listen_ip())]
        store = dist.PrefixStore(f"{BACKEND}/{group_id}", self._store)
        start = time.perf_counter()
        self._group = dist.ProcessGroupGloo(store, rank, world_size, options)
        self._group.barrier().wait()
        self._group_state = GroupState(group_id, rank, world_size)
        seconds = time.perf_counter() - start
        logger.info("%s group %s ready: rank %d of %d in %.3fs", BACKEND, group_id, rank, world_size, seconds)

    def finalize(self) -> None:
        """Drop the group and the store after a sync, unless groups are kept (``rebuild_group=False``)."""
        if self.rebuild_group:
            self._drop_group()
            self._store = None
            self._endpoint = None
        self.rank = None
        self.world_size = None

    def _drop_group(self) -> None:
        group, self._group, self._group_state = self._group, None, None
        if group is not None:
            try:
                group.shutdown()
            except Exception:  # a group torn down by a failed peer; only freeing matters here
                logger.debug("%s: shutting a group down failed", BACKEND, exc_info=True)

    # ------------------------------------------------------------------ transfer

    def _broadcast(self, tensor: torch.Tensor) -> None:
        options = dist.BroadcastOptions()
        options.rootRank = 0
        options.rootTensor = 0
        options.timeout = self.timeout
        self._group.broadcast([tensor], options).wait()

    def _send_bucket(self, header: torch.Tensor, payload: torch.Tensor) -> None:
        self._broadcast(header)
        self._broadcast(payload)

    def _receive_bucket(self) -> tuple[dict[str, Any], torch.Tensor, bool]:
        header = torch.empty(_HEADER_FIELDS, dtype=torch.int64)
        self._broadcast(header)
        table_bytes, data_bytes, is_last = header.tolist()
        payload = torch.empty(table_bytes + data_bytes, dtype=torch.uint8)
        self._broadcast(payload)
        table = json.loads(payload[:table_bytes].numpy().tobytes())
        return table, payload[table_bytes:], bool(is_last)

    async def send_weights(
        self,
        weights: Iterable[tuple[str, torch.Tensor]] | AsyncIterator[tuple[str, torch.Tensor]],
        global_steps: Optional[int] = None,
    ) -> dict[str, float]:
        """Broadcast ``weights`` bucket by bucket (actor rank 0); other actor ranks only walk them.

        Returns:
            Sync metrics for the trainer (rank 0 only; empty on other ranks).
        """
        if self.rank is None:
            raise RuntimeError(f"{BACKEND}: init_process_group() must run before send_weights()")
        if self.rank < 0:
            # Producing each full tensor is collective over the actor group: keep rank 0 company.
            async for _ in ensure_async_iterator(weights):
                pass
            return {}
        assert self.rank == 0, "rollout workers do not send weights"

        loop = asyncio.get_running_loop()
        start = time.perf_counter()
        in_flight: Optional[asyncio.Future] = None
        entries: list[list[Any]] = []
        parts: list[torch.Tensor] = []
        filled = 0
        total_bytes = buckets = tensors = 0

        async def flush(is_last: bool) -> None:
            nonlocal in_flight, entries, parts, filled, total_bytes, buckets
            table = json.dumps({"global_steps": global_steps, "tensors": entries}).encode()
            payload = torch.cat([torch.frombuffer(bytearray(table), dtype=torch.uint8), *parts])
            header = torch.tensor([len(table), filled, int(is_last)], dtype=torch.int64)
            total_bytes += filled
            buckets += 1
            entries, parts, filled = [], [], 0
            # At most one bucket on the wire while the next one fills.
            if in_flight is not None:
                await in_flight
            in_flight = loop.run_in_executor(self._executor, self._send_bucket, header, payload)

        async for name, tensor in ensure_async_iterator(weights):
            tensor = tensor.detach()
            if tensor.device.type != "cpu":
                tensor = tensor.cpu()
            raw = tensor.contiguous().reshape(-1).view(torch.uint8)
            nbytes = raw.numel()
            shape, dtype = list(tensor.shape), str(tensor.dtype)
            offset = 0
            while True:
                size = min(self.bucket_size, nbytes - offset)
                if filled + size > self.bucket_size:
                    await flush(is_last=False)
                entries.append([name, shape, dtype, offset, size])
                parts.append(raw[offset : offset + size])
                filled += size
                offset += size
                if offset >= nbytes:
                    break
            tensors += 1
        await flush(is_last=True)
        await in_flight

        seconds = time.perf_counter() - start
        logger.info(
            "%s sent %d tensors (%.1f MiB) in %d buckets in %.2fs",
            BACKEND,
            tensors,
            total_bytes / 2**20,
            buckets,
            seconds,
        )
        return {
            f"checkpoint_engine/{BACKEND}/send_seconds": seconds,
            f"checkpoint_engine/{BACKEND}/mbytes": total_bytes / 2**20,
            f"checkpoint_engine/{BACKEND}/buckets": float(buckets),
        }

    async def receive_weights(self, global_steps: Optional[int] = None) -> AsyncIterator[tuple[str, torch.Tensor]]:
        """Yield the sent ``(name, tensor)`` pairs in order; each tensor owns its memory.

        Owning matters downstream: ``CPUServerAdapter`` holds tensors across buckets and Ray pickles
        a view with its whole storage.
        """
        if self.rank is None or self.rank < 1:
            raise RuntimeError(f"{BACKEND}: receive_weights() needs a rollout rank >= 1, got {self.rank}")
        loop = asyncio.get_running_loop()
        start = time.perf_counter()
        received = 0
        self._merging = None
        pending = loop.run_in_executor(self._executor, self._receive_bucket)
        while True:
            table, data, is_last = await pending
            # The next bucket comes in while this one is handed on.
            if not is_last:
                pending = loop.run_in_executor(self._executor, self._receive_bucket)
            sent_steps = table["global_steps"]
            if global_steps is not None and sent_steps != global_steps:
                logger.warning(
                    "%s: the sender sent step %s, this worker was told %s", BACKEND, sent_steps, global_steps
                )
            self.received_global_steps = sent_steps
            received += data.numel()
            for name, tensor in self._unpack(table["tensors"], data):
                yield name, tensor
            if is_last:
                break
        if self._merging is not None:
            raise RuntimeError(f"{BACKEND}: the stream ended inside tensor {self._merging[0]!r}")
        logger.info(
            "%s rank %d received %.1f MiB in %.2fs", BACKEND, self.rank, received / 2**20, time.perf_counter() - start
        )

    def _unpack(self, entries: list[list[Any]], data: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        """Rebuild the tensors of one bucket; a chunked tensor is assembled across buckets in ``_merging``."""
        position = 0
        for name, shape, dtype_name, offset, size in entries:
            dtype = _DTYPES[dtype_name]
            chunk = data[position : position + size]
            position += size
            nbytes = dtype.itemsize * _numel(shape)
            if offset == 0 and size == nbytes:
                # A whole tensor: copy it out of the bucket (offset 0 also satisfies view(dtype)).
                yield name, chunk.clone().view(dtype).reshape(shape)
                continue
            if offset == 0:
                if self._merging is not None:
                    raise RuntimeError(f"{BACKEND}: tensor {name!r} starts inside tensor {self._merging[0]!r}")
                self._merging = (name, torch.empty(shape, dtype=dtype))
            merged_name, merged = self._merging
            if merged_name != name:
                raise RuntimeError(f"{BACKEND}: a chunk of {name!r} arrived inside tensor {merged_name!r}")
            merged.reshape(-1).view(torch.uint8)[offset : offset + size] = chunk
            if offset + size == nbytes:
                self._merging = None
                yield name, merged
        if position != data.numel():
            raise RuntimeError(f"{BACKEND}: the bucket table covers {position} of its {data.numel()} bytes")


def _numel(shape: list[int]) -> int:
    numel = 1
    for dim in shape:
        numel *= dim
    return numel
