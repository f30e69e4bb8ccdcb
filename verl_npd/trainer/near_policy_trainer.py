"""The near-policy trainer: verl's PPO loop replaced by NPD's.

``NearPolicyTrainer`` is verl's ``RayPPOTrainer`` (the Ray single controller) with its own ``fit``.
Everything it builds in ``init_workers`` is reused unchanged: the FSDP actor worker group, the
rollout replicas with their load balancer, the teacher replicas, the weight-sync manager and the
agent loop (for validation). What changes is the step:

    PPO / OPD (verl)                       NPD (here)
    generate a batch, wait for it          take a batch from the near-policy buffer (generation
                                           keeps running in the background)
    old-log-prob / ref / advantage passes  none
    teacher scores inside the agent loop   teacher scores as samples finish, Δ-IFD filters them
    update, then sync every step           packed supervised update; sync every K steps

Why a trainer class and not a v1 trainer mode: verl's v1 modes route every sample through
TransferQueue and its replay buffer, which have no place for per-sample teacher/IFD scoring and
filtering before the buffer, nor for our packing. The class keeps verl's workers and managers and
owns only the loop; ``main_npd`` drives it like ``main_ppo`` drives ``RayPPOTrainer``.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import shutil
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
import torch
from ray.exceptions import ActorDiedError
from tqdm.auto import tqdm

from verl import DataProto
from verl.trainer.ppo.ray_trainer import RayPPOTrainer
from verl.utils import tensordict_utils as tu
from verl.workers.utils.padding import left_right_2_no_padding

from verl_npd.filters.delta_ifd import DeltaIFDFilter
from verl_npd.filters.ifd import TokenizerInfo, render_chat_ids
from verl_npd.losses.cross_tokenizer import SPAN_KEY as CROSS_SPAN_KEY, ULD_WEIGHT_KEY
from verl_npd.trainer.packing import pack_for_ranks, packing_efficiency, rank_major_order
from verl_npd.trainer.packed_micro_batches import MICRO_BATCH_KEY
from verl_npd.rollout.async_manager import AsyncRolloutManager, GeneratedSample, PromptItem, PromptStream
from verl_npd.engines.cpu_server_registration import ROLLOUT_NAME as CPU_ROLLOUT_NAME
from verl_npd.rollout.scoring import ServerPool
from verl_npd.rollout.buffer import BufferClosed, NearPolicyBuffer
from verl_npd.rollout.sample_io import load_samples, save_samples
from verl_npd.trainer.checkpoints import (
    CheckpointError,
    choose_checkpoint,
    earlier_checkpoints,
    step_of,
    write_manifest,
)
from verl_npd.trainer.config import NPDConfig
from verl_npd.trainer.student_export import has_hf_weights, publish_student, run_reward_function
from verl_npd.trainer.summary import RunSummary, validation_accuracy, write_text_atomically

logger = logging.getLogger("verl_npd")

# How long a standalone replica's server may take to answer the liveness check before a weight sync;
# one that is busy past it counts as alive (only a dead one is taken out).
LIVENESS_TIMEOUT_S = 10.0


class NearPolicyTrainer(RayPPOTrainer):
    def __init__(self, *args, npd_config: NPDConfig, stop_requested: threading.Event | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.npd = npd_config
        if self.npd.teacher.url is not None:
            # A served teacher: verl builds no teacher replicas (ray_trainer.py:926 reads
            # use_teacher_policy) and reserves no teacher pool, which main_ppo_v0.py:94 adds whenever
            # distillation is enabled (the actor's loss needs it enabled).
            self.use_teacher_policy = False
            self.resource_pool_manager.resource_pool_spec.pop("teacher_pool", None)
        self.stop_requested = stop_requested or threading.Event()
        self._last_saved_step = 0
        # Checkpoints a resume found unusable and skipped ({"step", "problem"}), for the summary.
        self.unusable_checkpoints: list[dict] = []
        self.nonfinite_steps = 0
        self.nonfinite_streak = 0
        rollout = self.config.actor_rollout_ref.rollout
        self.samples_per_step = self.config.data.train_batch_size * rollout.n
        self.buffer = NearPolicyBuffer(
            capacity=self.npd.buffer.capacity,
            max_staleness=self.npd.buffer.max_staleness,
            batch_size=self.samples_per_step,
            stale_policy=self.npd.buffer.stale_policy,
            expected_keep_fraction=self._expected_keep_fraction(),
        )
        self.stream = PromptStream(
            dataset_size=len(self.train_dataset),
            seed=self.config.data.get("seed", 1),
            shuffle=self.config.data.get("shuffle", True),
        )
        self.output_dir = os.path.abspath(self.npd.output_dir)
        # The latest figures for the console's progress bar (main_npd's LiveProgress reads them);
        # empty until the workers are up and training begins.
        self.progress: dict[str, Any] = {}
        self.rollout_manager: AsyncRolloutManager | None = None
        # The version a weight sync in progress sends, and the one a stop request arrived during.
        self.syncing_to: int | None = None
        self.stopped_during_sync: int | None = None
        # verl's own switch for a rollout pool of its own (rollout.yaml: "Number of nodes for
        # standalone rollout server"), as in its separate_async trainer.
        self.standalone_rollout = rollout.nnodes > 0

    # ---- setup ---------------------------------------------------------------------------------

    def init_workers(self):
        super().init_workers()
        if self.standalone_rollout:
            self._init_standalone_rollout()

    def _init_standalone_rollout(self) -> None:
        """Student generation on replicas with their own resources, as verl's separate_async does
        (trainer_separate_async.py ``_setup``): the trainer never waits for its GPUs to switch.

        verl 0.9.1's ``RayPPOTrainer`` always builds colocated replicas too (ray_trainer.py:333-334
        requires its hybrid engine, :951 builds them). They serve validation only here, woken and
        synced in-process (the ``naive`` engine) for it and put back to sleep after; only with
        ``rollout.free_cache_engine=true`` (as the recipes set it) does a sleep free their memory on
        the trainer's GPUs (vllm_async_server.py:853-862). The standalone replicas, built with their
        own memory share (:func:`standalone_rollout_config`), get the weights through the configured
        checkpoint engine (nccl on GPUs, ``npd_gloo`` on CPU) every ``sync_interval``.
        """
        from dataclasses import replace

        from verl.checkpoint_engine import CheckpointEngineManager
        from verl.utils.config import omega_conf_to_dataclass
        from verl.workers.rollout.llm_server import LLMServerManager

        engine_config = omega_conf_to_dataclass(self.config.actor_rollout_ref.rollout.checkpoint_engine)
        colocated = self.llm_server_manager.get_replicas()
        self.checkpoint_manager = CheckpointEngineManager(
            config=replace(engine_config, backend="naive"), actor_wg=self.actor_rollout_wg, replicas=colocated
        )
        self.standalone_server_manager = LLMServerManager.create(
            config=standalone_rollout_config(self.config), start_rank=len(colocated)
        )
        self.standalone_checkpoint_manager = CheckpointEngineManager(
            config=engine_config,
            actor_wg=self.actor_rollout_wg,
            replicas=self.standalone_server_manager.get_replicas(),
        )

    def _prompt_item(self, position: int) -> PromptItem:
        row = self.train_dataset[self.stream.dataset_index(position)]
        prompt_ids = render_chat_ids(
            self.tokenizer, row["raw_prompt"], add_generation_prompt=True, **chat_template_kwargs(self.config.data)
        )
        teacher_key = self.config.distillation.get("teacher_key", "data_source")
        routing_key = row.get(teacher_key)
        return PromptItem(
            position=position,
            prompt_ids=prompt_ids,
            routing_key=None if routing_key is None else str(routing_key),
            extra={"data_source": str(row.get("data_source"))},
            messages=[dict(message) for message in row["raw_prompt"]] if self.npd.cross_tokenizer.enabled else None,
        )

    def _expected_keep_fraction(self) -> float:
        """What the Δ-IFD filter is expected to keep before it has kept anything: the width of a
        quantile band, all otherwise (the buffer measures the real fraction as samples come)."""
        band = self.npd.filter
        if band.enabled and band.band == "quantile":
            return max(band.hi - band.lo, 0.05)
        return 1.0

    def _build_rollout_manager(self) -> AsyncRolloutManager:
        rollout = self.config.actor_rollout_ref.rollout
        generation = self.npd.generation
        def pool(handles, name: str, engine: str, labels=None, on_dead=None) -> ServerPool:
            return ServerPool(
                handles,
                name=name,
                batched=engine == CPU_ROLLOUT_NAME,
                timeout_s=generation.request_timeout_s,
                max_retries=generation.max_retries,
                labels=labels,
                on_dead=on_dead,
            )

        student_servers = self.standalone_server_manager if self.standalone_rollout else self.llm_server_manager
        student_pool = pool(
            student_servers.server_handles,
            "rollout",
            rollout.name,
            labels=[f"student rollout replica {r.replica_rank}" for r in student_servers.get_replicas()],
            on_dead=self._take_out_student_replica if self.standalone_rollout else None,
        )
        if self.standalone_rollout:
            # A weight sync aborts what standalone replicas generate; verl's client resumes it.
            from verl.workers.rollout.llm_server import FullyAsyncLLMServerClient

            student_generation_client = student_servers.get_client(client_cls=FullyAsyncLLMServerClient)
        else:
            student_generation_client = student_pool
        prompts_per_batch = self.config.data.train_batch_size
        return AsyncRolloutManager(
            student_generation_client=student_generation_client,
            student_scorer=student_pool,
            teacher_scorers=self._teacher_scorers(pool),
            teacher_topk=self.config.distillation.distillation_loss.topk,
            buffer=self.buffer,
            sample_filter=DeltaIFDFilter(self.npd.filter),
            prompt_fn=self._prompt_item,
            stream=self.stream,
            header_ids=assistant_header_ids(self.tokenizer, self.config.data),
            samples_per_prompt=rollout.n,
            sampling_params={"temperature": rollout.temperature, "top_p": rollout.top_p, "top_k": rollout.top_k},
            max_wave_prompts=generation.max_concurrent_prompts,
            max_waves_in_flight=max(1, generation.max_concurrent_prompts // prompts_per_batch),
            request_timeout_s=generation.request_timeout_s,
            max_retries=generation.max_retries,
            seed=self.stream.seed,
            cross_tokenizers=self._cross_tokenizers(),
        )

    def _cross_tokenizers(self) -> dict:
        """With ``npd.cross_tokenizer.enabled``, how each teacher reads the student's samples in its
        own tokens (its tokenizer from its ``model_path``); empty otherwise."""
        if not self.npd.cross_tokenizer.enabled:
            return {}
        from verl.utils.config import omega_conf_to_dataclass

        from verl_npd.rollout.cross_tokenizer import CrossTokenizer
        from verl_npd.tokenizers import load_tokenizer

        trust = bool(self.config.actor_rollout_ref.model.get("trust_remote_code", False))
        kwargs = chat_template_kwargs(self.config.data)
        # Keyed as verl keys its teacher replicas (each teacher's routing key, not its YAML name).
        teachers = omega_conf_to_dataclass(self.config.distillation).teacher_models
        return {
            key: CrossTokenizer(self.tokenizer, load_tokenizer(teacher.model_path, trust), **kwargs)
            for key, teacher in teachers.items()
        }

    def _teacher_scorers(self, pool) -> dict:
        """Each teacher's scorer: its verl replicas, or the teacher served at ``npd.teacher.url``."""
        served = self.npd.teacher
        if served.url is not None:
            from verl.utils.config import omega_conf_to_dataclass

            from verl_npd.rollout.remote_teacher import HTTPTeacher, teacher_api_key
            from verl_npd.tokenizers import load_tokenizer

            # The routing key, as verl's teacher manager keys its replicas.
            ((key, teacher),) = omega_conf_to_dataclass(self.config.distillation).teacher_models.items()
            trust = bool(self.config.actor_rollout_ref.model.get("trust_remote_code", False))
            return {
                key: HTTPTeacher(
                    served.urls,
                    api=served.api,
                    model=served.model,
                    api_key=teacher_api_key(served.api_key_env),
                    max_concurrency=served.max_concurrency,
                    max_tokens_per_request=served.max_tokens_per_request,
                    timeout_s=self.npd.generation.request_timeout_s,
                    max_wait_s=served.max_wait_s,
                    probe_timeout_s=served.probe_timeout_s,
                    # The teacher's own tokenizer across tokenizers: its ids are the teacher's.
                    num_valid_tokens=len(self.tokenizer)
                    if not self.npd.cross_tokenizer.enabled
                    else len(load_tokenizer(teacher.model_path, trust)),
                )
            }
        teachers = self.teacher_model_manager.distillation_config.teacher_models
        return {
            key: pool(
                handles,
                f"teacher {key!r}",
                teachers[key].inference.name,
                labels=[f"teacher {key!r} replica {rank}" for rank in range(len(handles))],
            )
            for key, handles in self.teacher_model_manager.server_handles.items()
        }

    def _take_out_student_replica(self, server) -> None:
        """A standalone student replica whose server died: out of verl's load balancer (which would
        route requests to it again) and of the weight syncs (which would fail on it), and its
        workers, which hold its GPUs, stopped. Colocated replicas run in the trainer's workers and
        cannot be taken out: their death fails the next weight sync, which ends the run."""
        manager = self.standalone_server_manager
        (replica,) = [r for r in manager.get_replicas() if r._server_handle._actor_id == server._actor_id]
        manager.global_load_balancer.remove_servers.remote([replica._server_address])
        self.standalone_checkpoint_manager.remove_replicas([replica])
        for worker in replica.workers:
            ray.kill(worker, no_restart=True)

    # ---- the loop ------------------------------------------------------------------------------

    def fit(self) -> dict[str, Any]:
        from omegaconf import OmegaConf
        from verl.utils.tracking import Tracking

        tracker = Tracking(
            project_name=self.config.trainer.project_name,
            experiment_name=self.config.trainer.experiment_name,
            default_backend=self.config.trainer.logger,
            config=OmegaConf.to_container(self.config, resolve=True),
        )
        self.global_steps = 0
        self._load_checkpoint()
        first_step = self.global_steps
        summary = RunSummary(
            output_dir=self.output_dir,
            resume_step=first_step,
            extra={"teacher_accuracy": self.npd.teacher_accuracy, "unusable_checkpoints": self.unusable_checkpoints},
        )
        self._sync_weights(self.global_steps)

        # verl's step count (trainer.total_training_steps, else epochs x batches), the one its
        # learning-rate schedule was built for (ray_trainer.py:435-447).
        total = self.total_training_steps
        self.progress = {"step": self.global_steps, "total": total, "validations": []}
        if self.config.trainer.get("val_before_train", True) and not self.stop_requested.is_set():
            val_metrics = self._validate_student()
            summary.record_validation(self.global_steps, val_metrics, initial=True)
            self._show_validation(self.global_steps, val_metrics)
            tracker.log(data=val_metrics, step=self.global_steps)

        self.rollout_manager = self._build_rollout_manager()
        self.rollout_manager.start()
        progress = tqdm(total=total, initial=self.global_steps, desc="NPD training", unit="step")
        last_sync_step = self.global_steps
        try:
            while self.global_steps < total and not self.stop_requested.is_set():
                try:
                    metrics, positions = self._train_step()
                except BufferClosed:
                    if self.stop_requested.is_set():
                        break
                    raise
                step = self.global_steps
                drift = metrics.get("npd/drift_kl")
                adaptive = (
                    self.npd.adaptive_sync.enabled
                    and drift is not None
                    and drift > self.npd.adaptive_sync.drift_kl_threshold
                )
                if step % self.npd.sync_interval == 0 or adaptive or step == total:
                    metrics.update(self._sync_weights(step))
                    metrics["npd/adaptive_sync"] = float(adaptive and step % self.npd.sync_interval != 0)
                    last_sync_step = step
                metrics["npd/steps_since_sync"] = float(step - last_sync_step)
                metrics.update(self.rollout_manager.drain_metrics())
                positions["filtered"] = self.rollout_manager.drain_filtered_positions()
                test_freq = self.config.trainer.test_freq
                if test_freq > 0 and (step % test_freq == 0 or step == total):
                    # Generation pauses for it: validation measures the run and must not hide work.
                    self.rollout_manager.pause()
                    validation_start = time.perf_counter()
                    val_metrics = self._validate_student()
                    metrics["timing/validation"] = time.perf_counter() - validation_start
                    self.rollout_manager.resume()
                    metrics.update(val_metrics)
                    summary.record_validation(step, val_metrics)
                    self._show_validation(step, val_metrics)
                nonfinite = self._count_nonfinite(step, metrics)
                # Recorded before the checkpoint: a run resumed from step t has the rows of steps 1..t.
                summary.record_step(step, metrics, positions)
                if nonfinite:
                    raise nonfinite
                save_freq = self.config.trainer.save_freq
                if save_freq > 0 and (step % save_freq == 0 or step == total):
                    self._save_periodic_checkpoint()
                tracker.log(data=metrics, step=step)
                progress.update(1)
                self.progress.update(
                    step=step,
                    staleness=metrics.get("npd/staleness_max"),
                    kept=metrics.get("npd/kept_fraction", self.progress.get("kept")),
                    tokens_per_s=metrics.get("perf/train_tokens_per_s"),
                )
        except BaseException as failure:
            progress.close()
            self.rollout_manager.stop()
            self._save_on_the_way_out(f"the run failed ({failure!r})")
            raise
        progress.close()
        self.rollout_manager.stop()
        if self.stop_requested.is_set():
            self._save_on_the_way_out("a stop was requested")
        summary.extra["servers_lost"] = self.rollout_manager.servers_lost()
        summary.extra["stopped_during_sync"] = self.stopped_during_sync
        result = summary.finish(
            steps_run=self.global_steps - first_step,
            buffer_counters=self.buffer.counters.as_dict(),
            interrupted=self.stop_requested.is_set() and self.global_steps < total,
            last_checkpoint_step=self._last_saved_step,
            student_dir=self._export_student(),
        )
        tracker.log(data={f"summary/{k}": v for k, v in result.items() if isinstance(v, int | float)}, step=total)
        return result

    def _count_nonfinite(self, step: int, metrics: dict[str, float]) -> NonFiniteTraining | None:
        """verl skips the optimizer step of a gradient whose norm is not finite (its engine's
        optimizer_step, verl/workers/engine/fsdp/transformer_impl.py:822-825), so such a step leaves
        the weights as they were. Counted in ``npd/nonfinite_steps``; after
        ``npd.max_nonfinite_steps`` in a row, the error that ends the run (raised once the step is
        recorded): every further update would be skipped too."""
        grad_norm = metrics.get("actor/grad_norm")
        finite = grad_norm is None or math.isfinite(grad_norm)
        self.nonfinite_streak = 0 if finite else self.nonfinite_streak + 1
        self.nonfinite_steps += 0 if finite else 1
        metrics["npd/nonfinite_steps"] = float(self.nonfinite_steps)
        if self.nonfinite_streak < self.npd.max_nonfinite_steps:
            return None
        first = step - self.nonfinite_streak + 1
        return NonFiniteTraining(
            f"steps {first}-{step} had non-finite gradients (the last's norm {grad_norm}, loss "
            f"{metrics.get('actor/loss')}); verl skipped their updates, so the weights are those after step {first - 1}. "
            f"npd.max_nonfinite_steps={self.npd.max_nonfinite_steps} in a row end the run: lower the learning rate, or "
            "look for non-finite teacher scores"
        )

    def _show_validation(self, step: int, val_metrics: dict[str, float]) -> None:
        accuracy = validation_accuracy(val_metrics)
        self.progress["accuracy"] = accuracy
        self.progress["validations"] = [*self.progress["validations"], (step, accuracy)]

    def request_stop(self) -> None:
        """Finish the step in progress (or abandon a wait for samples), checkpoint and return.
        Called from another thread (the task runner's, on SIGTERM/SIGINT of the driver). A weight
        sync in progress finishes first: the rollout then holds the weights of the checkpoint."""
        if self.syncing_to is not None:
            self.stopped_during_sync = self.syncing_to
            logger.warning("verl-npd: stop requested during the weight sync to version %d; it finishes first", self.syncing_to)
        self.stop_requested.set()
        self.buffer.close()

    def _save_on_the_way_out(self, why: str) -> None:
        """Checkpoint the steps trained since the last checkpoint, so a stop or a failure loses no
        finished step. A failure to save is logged, never allowed to hide the original error."""
        if self.global_steps == self._last_saved_step:
            return
        logger.warning("verl-npd: %s; saving a checkpoint at step %d", why, self.global_steps)
        try:
            self._save_checkpoint()
        except Exception:
            logger.exception("verl-npd: the checkpoint at step %d could not be saved", self.global_steps)

    def _sync_weights(self, step: int) -> dict[str, float]:
        """Send the student's weights to the replicas that generate its samples."""
        start = time.perf_counter()
        manager = self.standalone_checkpoint_manager if self.standalone_rollout else self.checkpoint_manager
        students = self.rollout_manager.student_scorer if self.standalone_rollout and self.rollout_manager else None
        if students is not None:
            # A replica that died with nothing in flight is found here, not by the sync failing on it.
            students.check_alive(timeout_s=LIVENESS_TIMEOUT_S)
        self.syncing_to = step
        try:
            while True:
                try:
                    engine_metrics = manager.update_weights(step) or {}
                    break
                except ActorDiedError as e:
                    # A replica's server died during the sync's calls to the servers (the abort
                    # before the transfer, the resume after it: verl's checkpoint_engine/base.py
                    # :522-560): it is taken out, and the others are synced again. A death during
                    # the transfer reaches here as the worker's error instead, and ends the run.
                    if students is None or not students.take_out(e, in_flight=0):
                        raise
        finally:
            self.syncing_to = None
        self.buffer.set_rollout_version(step)
        return {"timing/sync": time.perf_counter() - start, **engine_metrics}

    def _validate_student(self) -> dict[str, float]:
        """verl's validation (the configured reward's accuracy on held-out prompts) through the colocated
        replicas. With standalone rollout they are synced to the trainer's current weights for it
        and sleep again after; otherwise they are the generating replicas and hold the last sync."""
        if not self.standalone_rollout:
            return self._validate()
        self.checkpoint_manager.update_weights(self.global_steps)
        metrics = self._validate()
        self.checkpoint_manager.sleep_replicas()
        return metrics

    def _train_step(self) -> tuple[dict[str, float], dict[str, list[int]]]:
        """One update; returns its metrics and the stream positions it trained on and dropped."""
        step_start = time.perf_counter()
        taken = self.buffer.take(self.samples_per_step, trainer_version=self.global_steps)
        token_budget = self.config.actor_rollout_ref.actor.ppo_max_token_len_per_gpu
        packed = train_packed(
            self.actor_rollout_wg,
            [s.payload for s in taken.samples],
            data_parallel_size=self._get_dp_size(self.actor_rollout_wg, "actor"),
            pad_id=self.tokenizer.pad_token_id,
            token_budget=token_budget,
            truncate=self.npd.packing.truncate,
            temperature=self.config.actor_rollout_ref.rollout.temperature,
            seed=self.global_steps,
            uld_weight=self.npd.cross_tokenizer.uld_weight,
        )
        self.global_steps += 1
        tokens = sum(packed.lengths)
        all_bins = [bin_ for bins in packed.rank_bins for bin_ in bins]
        metrics = {
            "timing/wait_gen": taken.wait_s,
            "timing/train": packed.train_s,
            "timing/step": time.perf_counter() - step_start,
            "perf/train_tokens_per_s": tokens / packed.train_s,
            "perf/train_tokens": float(tokens),
            "npd/behaviour_version_min": float(min(s.version for s in taken.samples)),
            "npd/behaviour_version_max": float(max(s.version for s in taken.samples)),
            "npd/staleness_mean": float(np.mean(taken.staleness)),
            "npd/staleness_max": float(np.max(taken.staleness)),
            "npd/dropped_stale": float(len(taken.dropped_stale)),
            # The real fill: the micro-batches of every rank count.
            "npd/packing_efficiency": packing_efficiency(packed.lengths, all_bins, token_budget),
            "npd/micro_batches": float(len(all_bins)),
            "npd/micro_batches_per_rank": float(len(packed.rank_bins[0])),
            "npd/buffer_queued": float(self.buffer.queued),
            "npd/rollout_version": float(self.buffer.rollout_version),
        }
        metrics.update(packed.metrics)
        positions = {
            "trained": [s.payload.prompt.position for s in taken.samples],
            "dropped_stale": [s.payload.prompt.position for s in taken.dropped_stale],
        }
        return metrics, positions

    # ---- checkpoints ---------------------------------------------------------------------------

    # Our own save/load instead of RayPPOTrainer's: NPD has no dataloader (verl pickles its state
    # to data.pt and loads it with torch.load(weights_only=False), ray_trainer.py:1114) and keeps
    # its own state as json + safetensors; and the "latest checkpoint" marker must be written only
    # once every part of the checkpoint is on disk, so that a kill at any moment leaves the previous
    # checkpoint usable (verl writes it before we could add our part).

    def _save_periodic_checkpoint(self) -> None:
        """A checkpoint that cannot be written (a full disk, a lost mount) ends the run, naming the
        checkpoint that is still usable: the "latest" marker moves only once a checkpoint is whole."""
        try:
            self._save_checkpoint()
        except Exception as failure:
            kept = (
                f"the checkpoint of step {self._last_saved_step} is intact: fix the cause and run the same command "
                "to resume from it"
                if self._last_saved_step
                else "no checkpoint was written before it"
            )
            raise CheckpointError(
                f"the checkpoint of step {self.global_steps} could not be written ({failure!r}); {kept}"
            ) from failure

    def _step_dir(self, step: int) -> str:
        return os.path.join(os.path.abspath(self.config.trainer.default_local_dir), f"global_step_{step}")

    def _save_checkpoint(self):
        trainer = self.config.trainer
        step_dir = self._step_dir(self.global_steps)
        remote = None if trainer.default_hdfs_dir is None else os.path.join(
            trainer.default_hdfs_dir, f"global_step_{self.global_steps}", "actor"
        )
        self.actor_rollout_wg.save_checkpoint(
            os.path.join(step_dir, "actor"),
            remote,
            self.global_steps,
            max_ckpt_to_keep=trainer.get("max_actor_ckpt_to_keep", None),
        )
        state_dir = os.path.join(step_dir, "npd")
        os.makedirs(state_dir, exist_ok=True)
        samples, buffer_state, stream_state = self.rollout_manager.checkpoint_state()
        save_samples(os.path.join(state_dir, "buffer"), samples)
        state = {"buffer": buffer_state, "stream": stream_state, "step": self.global_steps}
        write_text_atomically(os.path.join(state_dir, "state.json"), json.dumps(state))
        write_manifest(step_dir)
        write_text_atomically(
            os.path.join(os.path.abspath(trainer.default_local_dir), "latest_checkpointed_iteration.txt"),
            str(self.global_steps),
        )
        self._last_saved_step = self.global_steps

    def _export_student(self) -> str:
        """The student as it is now, as a Hugging Face model in ``<output_dir>/student``: from the
        checkpoint of this step when there is one, else from a checkpoint written for the export
        alone, outside ``default_local_dir`` (a checkpoint there would make the next run resume)."""
        hf_dir = os.path.join(self._step_dir(self.global_steps), "actor", "huggingface")
        reward_function = run_reward_function(self.config)
        if self._last_saved_step == self.global_steps and has_hf_weights(hf_dir):
            return publish_student(hf_dir, self.output_dir, reward_function)
        scratch = os.path.join(self.output_dir, "student-checkpoint")
        self.actor_rollout_wg.save_checkpoint(scratch, None, self.global_steps, max_ckpt_to_keep=None)
        try:
            return publish_student(os.path.join(scratch, "huggingface"), self.output_dir, reward_function)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def _load_checkpoint(self):
        from verl.utils.checkpoint.checkpoint_manager import find_latest_ckpt_path

        trainer = self.config.trainer
        if trainer.resume_mode == "disable":
            return
        if trainer.resume_mode == "resume_path":
            # The user named this one: no other is taken in its place.
            candidates = [os.path.abspath(trainer.resume_from_path)]
        else:
            latest = find_latest_ckpt_path(os.path.abspath(trainer.default_local_dir))
            if latest is None:
                return
            candidates = earlier_checkpoints(latest)
        step_dir, self.unusable_checkpoints = choose_checkpoint(candidates)
        if self.unusable_checkpoints:
            skipped = "; ".join(f"step {s['step']}: {s['problem']}" for s in self.unusable_checkpoints)
            logger.warning("verl-npd: skipped unusable checkpoints (%s); resuming from step %d", skipped, step_of(step_dir))
        with open(os.path.join(step_dir, "npd", "state.json")) as f:
            state = json.load(f)
        self.global_steps = int(state["step"])
        self.actor_rollout_wg.load_checkpoint(
            os.path.join(step_dir, "actor"), del_local_after_load=trainer.del_local_ckpt_after_load
        )
        self.buffer.restore(load_samples(os.path.join(step_dir, "npd", "buffer")), state["buffer"])
        self.stream.load_state_dict(state["stream"])
        self._last_saved_step = self.global_steps
        logger.info("verl-npd: resumed at step %d with %d buffered samples", self.global_steps, self.buffer.queued)


class NonFiniteTraining(RuntimeError):
    """Too many steps in a row had non-finite gradients."""


def chat_template_kwargs(data_config) -> dict[str, Any]:
    """verl's ``data.apply_chat_template_kwargs``: how every prompt is rendered (verl's dataset
    renders its prompts with them too)."""
    return dict(data_config.get("apply_chat_template_kwargs", None) or {})


def assistant_header_ids(tokenizer, data_config) -> tuple[int, ...]:
    """The assistant header that opens the unconditional Δ-IFD prefills (header + response),
    rendered with the chat-template arguments the prompts were rendered with: with Qwen3's
    ``enable_thinking: false`` the header the student generated after is ``<|im_start|>assistant\n``
    followed by an empty think block, and the unconditional terms must condition on the same."""
    return TokenizerInfo.from_tokenizer(tokenizer, **chat_template_kwargs(data_config)).header_ids


def standalone_rollout_config(config):
    """The config the standalone replicas are built from: with ``rollout.standalone_gpu_memory_utilization``
    set, that is their memory share (they own their GPUs), while ``gpu_memory_utilization`` stays the
    share of the replicas verl 0.9.1 still builds on the trainer's GPUs for validation; verl's
    fully-async rollouter builds its standalone replicas the same way
    (verl/experimental/fully_async_policy/fully_async_rollouter.py:110-128)."""
    from omegaconf import open_dict

    share = config.actor_rollout_ref.rollout.get("standalone_gpu_memory_utilization")
    if share is None:
        return config
    standalone = copy.deepcopy(config)
    with open_dict(standalone):
        standalone.actor_rollout_ref.rollout.gpu_memory_utilization = share
    return standalone


@dataclass
class PackedUpdate:
    lengths: list[int]
    """Tokens (prompt + response) of each sample, in the order the samples were given."""
    rank_bins: list[list[list[int]]]
    """Per data-parallel rank, its micro-batches as indices into the given samples."""
    metrics: dict[str, float]
    """The actor's metrics (``actor/*``) and the loss's ``npd/*`` metrics."""
    train_s: float
    """Seconds in verl's ``update_actor``."""


def train_packed(
    actor_wg,
    samples: list[GeneratedSample],
    *,
    data_parallel_size: int,
    pad_id: int,
    token_budget: int,
    truncate: bool = False,
    temperature: float,
    seed: int,
    uld_weight: float | None = None,
) -> PackedUpdate:
    """One supervised distillation step of verl's actor on ``samples``: no old-log-prob, ref or
    advantage pass.

    The samples are packed per data-parallel rank (:func:`pack_for_ranks`) and sent in
    :func:`rank_major_order`: verl's dispatch gives rank r the r-th equal chunk of the batch
    (``make_nd_compute_dataproto_dispatch_fn`` -> ``chunk_tensordict``), and the patched
    ``prepare_micro_batches`` trains each of that rank's bins as one micro-batch. The loss is
    normalised by the response tokens of the whole global batch (verl's ``batch_num_tokens``,
    all-reduced over the ranks, times ``dp_size`` against FSDP's gradient mean), so the update does
    not depend on the number of ranks.

    Samples scored across tokenizers (``teacher_span`` set) carry their span per row, nested like the
    teacher's top-k, and ``uld_weight``: the loss is then the cross-tokenizer loss
    (:mod:`verl_npd.losses.cross_tokenizer`).
    """
    lengths = [len(s.prompt.prompt_ids) + len(s.response_ids) for s in samples]
    rank_bins = pack_for_ranks(lengths, token_budget, data_parallel_size, truncate=truncate)
    order, micro_batch = rank_major_order(rank_bins)
    batch = collate_samples([samples[i] for i in order], pad_id)
    batch.batch[MICRO_BATCH_KEY] = torch.tensor(micro_batch, dtype=torch.long)
    batch.meta_info["temperature"] = temperature
    batch_td = left_right_2_no_padding(batch.to_tensordict())
    if CROSS_SPAN_KEY in batch_td.keys():
        if uld_weight is None:
            raise ValueError("samples scored across tokenizers need the ULD weight (npd.cross_tokenizer.uld_weight)")
        nest_like_input_ids(batch_td, CROSS_SPAN_KEY)
        tu.assign_non_tensor(batch_td, **{ULD_WEIGHT_KEY: float(uld_weight)})
    tu.assign_non_tensor(
        batch_td,
        calculate_entropy=False,
        distillation_use_topk=True,
        # False keeps the student's sampled-token log-probs in the training forward: the loss
        # reports npd/drift_kl from them at no extra cost.
        distillation_only=False,
        global_batch_size=len(batch),
        mini_batch_size=len(batch),
        epochs=1,
        seed=seed,
        dataloader_kwargs={"shuffle": False},
        compute_loss=True,
        use_dynamic_bsz=True,
        max_token_len_per_gpu=token_budget,
    )
    train_start = time.perf_counter()
    output = actor_wg.update_actor(batch_td)
    train_s = time.perf_counter() - train_start
    metrics = {f"actor/{k}": _mean(v) for k, v in tu.get(output, "metrics").items()} | _npd_metrics(output)
    return PackedUpdate(lengths=lengths, rank_bins=rank_bins, metrics=metrics, train_s=train_s)


def collate_samples(samples: list[GeneratedSample], pad_id: int) -> DataProto:
    """The samples in the layout verl's agent loop produces: left-padded prompts, right-padded
    responses, and the teacher's top-k over prompt+response padded the same way."""
    prompt_width = max(len(s.prompt.prompt_ids) for s in samples)
    response_width = max(len(s.response_ids) for s in samples)
    topk = samples[0].teacher_topk_ids.shape[-1]
    n, width = len(samples), prompt_width + response_width
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    response_mask = torch.zeros((n, response_width), dtype=torch.long)
    rollout_log_probs = torch.zeros((n, response_width), dtype=torch.float32)
    teacher_ids = torch.zeros((n, width, topk), dtype=torch.int32)
    teacher_log_probs = torch.zeros((n, width, topk), dtype=torch.float32)
    cross = samples[0].teacher_span is not None
    if any((s.teacher_span is not None) != cross for s in samples):
        raise ValueError("a batch mixes samples scored across tokenizers with samples scored in the student's tokens")
    teacher_span = torch.zeros((n, width), dtype=torch.int32) if cross else None
    for i, s in enumerate(samples):
        p, r = len(s.prompt.prompt_ids), len(s.response_ids)
        start, end = prompt_width - p, prompt_width + r
        input_ids[i, start:prompt_width] = torch.tensor(s.prompt.prompt_ids)
        input_ids[i, prompt_width:end] = torch.tensor(s.response_ids)
        attention_mask[i, start:end] = 1
        response_mask[i, :r] = 1
        rollout_log_probs[i, :r] = torch.tensor(s.rollout_log_probs[:r])
        teacher_ids[i, start:end] = s.teacher_topk_ids
        teacher_log_probs[i, start:end] = s.teacher_topk_log_probs
        if cross:
            teacher_span[i, start:end] = s.teacher_span
    position_ids = torch.clamp(attention_mask.cumsum(dim=-1) - 1, min=0)
    cross_tensors = {} if teacher_span is None else {CROSS_SPAN_KEY: teacher_span}
    return DataProto.from_single_dict(
        {
            **cross_tensors,
            "prompts": input_ids[:, :prompt_width],
            "responses": input_ids[:, prompt_width:],
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "position_ids": position_ids,
            "response_mask": response_mask,
            "rollout_log_probs": rollout_log_probs,
            "teacher_ids": teacher_ids,
            "teacher_logprobs": teacher_log_probs,
        }
    )


def nest_like_input_ids(batch_td, key: str) -> None:
    """``batch_td[key]``, [bsz, seq_len] left-right padded, as a nested tensor of the real tokens,
    as verl's ``left_right_2_no_padding`` does the teacher's top-k."""
    from verl.utils.attention_utils import index_first_axis

    indices = tu.get_non_tensor_data(data=batch_td, key="indices", default=None)
    values = index_first_axis(batch_td.pop(key).unsqueeze(-1).flatten(0, 1), indices).squeeze(-1)
    batch_td[key] = torch.nested.nested_tensor_from_jagged(values, offsets=batch_td["input_ids"].offsets())


def _mean(value) -> float:
    if isinstance(value, list):
        return float(np.mean([_mean(v) for v in value])) if value else float("nan")
    if hasattr(value, "value"):  # verl's Metric
        return _mean(value.value)
    if isinstance(value, torch.Tensor):
        return float(value.float().mean())
    return float(value)


def _npd_metrics(output) -> dict[str, float]:
    """Promote the loss's npd/* metrics (reported as actor/npd/...) to their spec names."""
    metrics = tu.get(output, "metrics")
    return {k: _mean(v) for k, v in metrics.items() if k.startswith("npd/")}
