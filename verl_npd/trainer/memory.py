"""Will each model of a run fit the share of a GPU the config gives it? Estimated from each model's
config.json before anything starts: what ``main_npd --check`` prints, and what the preflight
rejects when a model cannot fit.

The estimates, per GPU:

* a vLLM replica (the student's rollout, a teacher replica, a teacher served on the trainer's own
  GPUs): its weights, parameters x the bytes of its dtype / tensor-parallel size, within
  ``gpu_memory_utilization`` x the GPU's memory, the share vLLM takes at start-up and must also fit
  its KV cache in (vLLM refuses to start when less than that share is free: ``Worker.init_device``
  in vllm/v1/worker/gpu_worker.py);
* a trainer rank: FSDP2's sharded fp32 master weights, gradients and AdamW moments, 16 bytes per
  parameter / ranks (less what ``fsdp_config.param_offload``/``optimizer_offload`` move to the
  host), plus one micro-batch's logits, 12 bytes per token per vocabulary entry at
  ``actor.ppo_max_token_len_per_gpu`` tokens (fp32 logits, their log-softmax and gradient: about
  2 GB per 1k tokens for a 152k vocabulary, the figure the recipes' READMEs use); within the GPU's
  memory less what other processes keep there while it trains (a resident rollout, a served teacher).

Activations (verl checkpoints them), CUDA contexts and allocator fragmentation are not counted, so
a run the estimate rejects cannot fit, while one it accepts may still need headroom.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from omegaconf import DictConfig, OmegaConf

GIB = 2**30
# fp32 master weights (4) + gradients (4) + AdamW's two moments (8).
TRAINER_STATE_BYTES = {"params": 4, "grads": 4, "optimizer": 8}
LOGITS_BYTES_PER_TOKEN_AND_ENTRY = 12
DTYPE_BYTES = {"bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2, "half": 2, "float32": 4, "fp32": 4, "float": 4}


@dataclass(frozen=True)
class ModelSize:
    parameters: int
    vocab_size: int


@functools.lru_cache(maxsize=None)  # the check reads each model for its problems and for its report
def model_size(model_path: str, trust_remote_code: bool = False) -> ModelSize | None:
    """Parameters (tied weights once) and vocabulary of the model at ``model_path`` (a directory or
    a hub id in the local cache), counted on PyTorch's meta device from its config.json alone; None
    when the config cannot be read here."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        hf_config = AutoConfig.from_pretrained(str(model_path), trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(hf_config, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):  # not downloaded here, or an architecture transformers does not know
        return None
    return ModelSize(sum(p.numel() for p in model.parameters()), int(hf_config.vocab_size))


@dataclass(frozen=True)
class MemoryNeed:
    """One kind of process on one GPU: what it needs and what the config gives it."""

    what: str
    need_bytes: int
    how: str
    """How ``need_bytes`` was estimated."""
    budget_bytes: int
    budget_how: str
    """Where ``budget_bytes`` comes from (the key of the share, and what else holds the GPU)."""
    fix: str

    @property
    def fits(self) -> bool:
        return self.need_bytes <= self.budget_bytes

    def line(self) -> str:
        return (
            f"{self.what}: needs {size_text(self.need_bytes)} ({self.how}), "
            f"has {size_text(self.budget_bytes)} ({self.budget_how})"
        )

    def problem(self) -> str:
        return f"{self.line()}: {self.fix}"


def size_text(num_bytes: float) -> str:
    return f"{num_bytes / GIB:.1f} GiB" if num_bytes >= GIB / 10 else f"{num_bytes / 2**20:.1f} MiB"


def count_text(parameters: int) -> str:
    return f"{parameters / 1e9:.2f} B" if parameters >= 1e8 else f"{parameters / 1e6:.2f} M"


def dtype_bytes(dtype: str) -> int:
    return DTYPE_BYTES.get(str(dtype).removeprefix("torch."), 2)


def served_teacher_share(config: DictConfig) -> float:
    """The share of each trainer GPU a teacher served on those GPUs holds (``npd.teacher.gpu_memory_share``)."""
    if OmegaConf.select(config, "npd.teacher.url") is None:
        return 0.0
    return float(OmegaConf.select(config, "npd.teacher.gpu_memory_share") or 0.0)


def student_replica_share(rollout: DictConfig) -> tuple[float, str]:
    """The memory share of the replicas that generate the student's samples, and its key."""
    standalone = rollout.get("standalone_gpu_memory_utilization")
    if rollout.nnodes > 0 and standalone is not None:
        return float(standalone), "actor_rollout_ref.rollout.standalone_gpu_memory_utilization"
    return float(rollout.gpu_memory_utilization), "actor_rollout_ref.rollout.gpu_memory_utilization"


def resident_beside_trainer(config: DictConfig) -> list[tuple[str, float]]:
    """What other processes keep on a trainer GPU while it trains, as (what, share): the student's
    colocated vLLM unless it sleeps then (``free_cache_engine``; with a standalone rollout the
    colocated replicas only validate), and a teacher served on the same GPUs."""
    rollout = config.actor_rollout_ref.rollout
    resident = []
    if not rollout.free_cache_engine:
        role = "validation replicas" if rollout.nnodes > 0 else "the student's rollout"
        resident.append((f"{role} (actor_rollout_ref.rollout.gpu_memory_utilization)", float(rollout.gpu_memory_utilization)))
    if served_teacher_share(config) > 0:
        resident.append(("the served teacher (npd.teacher.gpu_memory_share)", served_teacher_share(config)))
    return resident


def memory_needs(config: DictConfig, gpu_memory_bytes: int) -> tuple[list[MemoryNeed], list[str]]:
    """Every process's need against its budget, and what could not be estimated (a model whose
    config.json is not readable here)."""
    trust = bool(config.actor_rollout_ref.model.get("trust_remote_code", False))
    needs: list[MemoryNeed] = []
    unknown: list[str] = []
    gpu = f"of the GPU's {size_text(gpu_memory_bytes)}"
    rollout = config.actor_rollout_ref.rollout
    student_path = str(config.actor_rollout_ref.model.path)
    student = model_size(student_path, trust)
    if student is None:
        unknown.append(f"the student ({student_path}): its config.json is not readable here")
    else:
        tp = rollout.tensor_model_parallel_size
        weights = student.parameters * dtype_bytes(rollout.dtype) // tp
        how = f"weights: {count_text(student.parameters)} params x {dtype_bytes(rollout.dtype)} B / TP {tp}"
        share, key = student_replica_share(rollout)
        role = "a standalone rollout replica" if rollout.nnodes > 0 else "the student's vLLM replica"
        needs.append(MemoryNeed(role, weights, how, int(share * gpu_memory_bytes), f"{key}={share} {gpu}",
                                f"raise {key} or actor_rollout_ref.rollout.tensor_model_parallel_size"))
        if rollout.nnodes > 0:
            share = float(rollout.gpu_memory_utilization)
            key = "actor_rollout_ref.rollout.gpu_memory_utilization"
            needs.append(MemoryNeed("a validation replica on a trainer GPU", weights, how,
                                    int(share * gpu_memory_bytes), f"{key}={share} {gpu}", f"raise {key}"))
        needs.append(trainer_need(config, student, gpu_memory_bytes))
    needs_teacher, unknown_teacher = teacher_needs(config, trust, gpu_memory_bytes)
    return needs + needs_teacher, unknown + unknown_teacher


def trainer_need(config: DictConfig, student: ModelSize, gpu_memory_bytes: int) -> MemoryNeed:
    actor = config.actor_rollout_ref.actor
    fsdp = actor.get("fsdp_config", {})
    ranks = config.trainer.n_gpus_per_node * config.trainer.nnodes
    per_param = TRAINER_STATE_BYTES["grads"]
    per_param += 0 if fsdp.get("param_offload", False) else TRAINER_STATE_BYTES["params"]
    per_param += 0 if fsdp.get("optimizer_offload", False) else TRAINER_STATE_BYTES["optimizer"]
    states = student.parameters * per_param // ranks
    budget = actor.ppo_max_token_len_per_gpu
    logits = budget * student.vocab_size * LOGITS_BYTES_PER_TOKEN_AND_ENTRY
    how = (
        f"FSDP2 states {count_text(student.parameters)} params x {per_param} B / {ranks} ranks = {size_text(states)}, "
        f"logits {budget} tokens (actor.ppo_max_token_len_per_gpu) x {student.vocab_size} x "
        f"{LOGITS_BYTES_PER_TOKEN_AND_ENTRY} B = {size_text(logits)}"
    )
    resident = resident_beside_trainer(config)
    left = 1.0 - sum(share for _, share in resident)
    beside = ", ".join(f"{what} {share}" for what, share in resident) or "nothing else resident"
    return MemoryNeed(
        "a trainer rank",
        states + logits,
        how,
        int(left * gpu_memory_bytes),
        f"the GPU's {size_text(gpu_memory_bytes)} less {beside}",
        "lower actor_rollout_ref.actor.ppo_max_token_len_per_gpu, add trainer GPUs, or lower the shares beside it",
    )


def teacher_needs(config: DictConfig, trust: bool, gpu_memory_bytes: int) -> tuple[list[MemoryNeed], list[str]]:
    needs, unknown = [], []
    if not config.distillation.enabled:
        return needs, unknown
    gpu = f"of the GPU's {size_text(gpu_memory_bytes)}"
    served = OmegaConf.select(config, "npd.teacher.url") is not None
    for key, teacher in config.distillation.teacher_models.items():
        path = str(teacher.model_path)
        if served and served_teacher_share(config) == 0:
            continue  # served on machines of its own
        found = model_size(path, trust)
        if found is None:
            unknown.append(f"the teacher {key!r} ({path}): its config.json is not readable here")
            continue
        inference = teacher.inference
        if served:
            share, share_key, tp = served_teacher_share(config), "npd.teacher.gpu_memory_share", 1
            role = "the teacher served on the trainer's GPU"
        else:
            tp = inference.tensor_model_parallel_size
            share_key = f"distillation.teacher_models.{key}.inference.gpu_memory_utilization"
            share, role = float(inference.gpu_memory_utilization), f"a replica of the teacher {key!r}"
        bytes_per = dtype_bytes(inference.get("dtype", "bfloat16"))
        how = f"weights: {count_text(found.parameters)} params x {bytes_per} B / TP {tp}"
        fix = (
            f"raise {share_key} with vllm serve's --gpu-memory-utilization"
            if served
            else f"raise {share_key} or distillation.teacher_models.{key}.inference.tensor_model_parallel_size"
        )
        needs.append(MemoryNeed(role, found.parameters * bytes_per // tp, how, int(share * gpu_memory_bytes),
                                f"{share_key}={share} {gpu}", fix))
    return needs, unknown


def gpu_memory_here() -> int | None:
    """Memory of this machine's first GPU, read through NVML (vLLM's nvidia-ml-py), which does not
    create a CUDA context in this process; None without NVML or a GPU."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0)).total)
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001 - no NVML library, no driver or no GPU: not known here
        return None
