"""Makes the NPD losses selectable in verl's own trainer: ``distillation.distillation_loss.loss_mode=npd_*``.

How verl 0.9.1 runs a top-k distillation loss (``verl/trainer/distillation/losses.py``,
``verl/workers/engine/fsdp/transformer_impl.py``):

1. ``DistillationLossConfig.__post_init__`` looks ``loss_mode`` up in the registry
   (``get_distillation_loss_settings``), so a name is valid exactly when it is registered. The plugin
   registers at ``import verl`` in every process, before Hydra's config is turned into dataclasses.
   ``use_topk=True`` makes the teacher return ``topk`` log-probs per token and the engine call the loss
   inside its logits processor.
2. Logits processor: ``FSDPEngineWithLMHead.prepare_model_outputs`` calls
   ``distillation_ppo_loss(student_logits=logits_rmpad.unsqueeze(0), data=micro_batch)`` with the
   temperature-scaled logits ``(1, total_nnz, V)`` of the packed micro-batch; that calls
   ``compute_topk_loss``, which in verl is hard-wired to verl's own forward KL whatever the loss_mode.
   Every tensor it returns, of shape ``(1, total_nnz)``, is stored in ``model_output`` as a jagged
   nested tensor.
3. Final loss: ``distillation_loss`` calls the registered ``fn(config, distillation_config,
   model_output, data) -> (per_token_loss (bsz, max_response_len), metrics)``, clamps it to
   ``loss_max_clamp`` and reduces it with ``agg_loss`` (``token-mean``: sum / global
   ``batch_num_tokens`` * dp_size, the same global-batch normalisation as ``reduce_token_loss``).

Adaptation done here:

- ``compute_topk_loss`` is wrapped (once) so that for ``npd_*`` loss modes the logits processor runs
  :func:`verl_npd.losses.distill.per_token_distillation_loss` on the packed logits, the teacher's
  top-k (``data["teacher_ids"|"teacher_logprobs"]``, nested, vLLM layout: entry t scores token t + 1)
  and the sampled next tokens (``input_ids`` rolled by one, as verl does for its log-probs). Other
  modes go to verl's function untouched. Only the FSDP/VeOmni engines are supported (Megatron shards
  the vocabulary over tensor-parallel ranks); Ulysses slicing mirrors verl's.
- The registered function turns those per-token outputs into verl's response layout with
  ``no_padding_2_padding`` and adds the top-k mass metrics, and ``npd/drift_kl`` (the drift of docs/algorithm.md,
  mean of log p_B - log p_S_now) when the batch carries ``rollout_log_probs`` and verl kept the
  student's sampled-token log-probs (``distillation_only=False``). Unlike verl's ``forward_kl_topk`` it does
  not clamp the loss at 0: the NPD losses are true divergences (>= 0).
- verl's own fields of ``distillation.distillation_loss`` say what they say for verl's losses:
  ``loss_mode`` names the divergence (see ``LOSS_NAMES``), ``topk`` how many teacher entries, and
  ``chunked_topk_chunk_size`` the tokens per chunk of the student's log-probs (verl's chunked top-k
  path, verl/trainer/distillation/fsdp/losses.py:26-63, computes the same logsumexp-and-gather per
  chunk of the flattened tokens; NPD's losses have only that path, so verl's switch between its two
  paths, ``use_chunked_topk``, is not read).
- The NPD losses' other settings, ``npd.loss`` (:class:`~verl_npd.losses.distill.NPDLossConfig`:
  ``tail_mode``, ``beta``), cannot travel in verl's config: the actor worker builds
  ``DistillationLossConfig`` with Hydra's ``instantiate`` from the section's ``_target_``
  (verl/workers/engine_workers.py:595-597 -> verl/utils/config.py:48-50;
  verl/trainer/config/distillation/distillation.yaml:20), whose generated ``__init__`` rejects an
  unknown keyword (``TypeError: ... unexpected keyword argument 'tail_mode'``). They reach the
  workers as the JSON environment variable ``VERL_NPD_LOSS`` instead: ``main_npd`` sets it from
  ``npd.loss`` in the job's Ray runtime environment; a run of verl's own trainer sets it in
  ``ray_kwargs.ray_init.runtime_env.env_vars`` (README). Unset, the defaults of ``npd.loss`` apply.

Recommended verl settings for NPD's supervised step: ``use_policy_gradient=False`` and
``use_task_rewards=False`` (then verl skips the policy loss), and ``loss_max_clamp=null`` (verl's
default 10.0 zeroes the gradient of tokens whose loss exceeds 10). ``log_prob_min_clamp`` is not used
by the NPD losses, which are stable without it; ``use_fused_kernels`` must stay off (no logits).
"""

import functools
import json
import logging
import os
from dataclasses import asdict, fields
from typing import Any

import torch

from verl_npd.losses.cross_tokenizer import SPAN_KEY, ULD_WEIGHT_KEY, cross_tokenizer_loss
from verl_npd.losses.distill import NPDLossConfig, per_token_distillation_loss
from verl_npd.platform.verl_version import apply_once

logger = logging.getLogger(__name__)

# npd.loss, as JSON: every field of NPDLossConfig.
ENV_VAR = "VERL_NPD_LOSS"
ENV_KEYS = tuple(f.name for f in fields(NPDLossConfig))

# verl loss_mode -> the loss_mode of per_token_distillation_loss.
LOSS_NAMES: dict[str, str] = {
    "npd_forward_kl_topk": "forward_kl_topk",
    "npd_reverse_kl_topk": "reverse_kl_topk",
    "npd_jsd": "jsd",
    "npd_ce": "ce",
}

# model_output keys; distinct from verl's so that a path that skipped our logits processor (fused
# kernels) fails loudly instead of silently training on verl's forward KL.
LOSS_KEY = "npd_distillation_losses"
STUDENT_MASS_KEY = "npd_student_mass"
TEACHER_MASS_KEY = "npd_teacher_mass"
# Across tokenizers only: the ULD term of the loss (docs/algorithm.md, "Across tokenizers").
ULD_KEY = "npd_uld"

SUPPORTED_STRATEGIES = ("fsdp", "fsdp2", "veomni")


def env_value(settings: NPDLossConfig) -> str:
    """``VERL_NPD_LOSS``'s value for ``npd.loss``."""
    return json.dumps(asdict(settings))


def env_settings() -> NPDLossConfig:
    """``npd.loss`` from the ``VERL_NPD_LOSS`` JSON object (``{"beta": 0.9}``), validated; its
    defaults when unset."""
    raw = os.environ.get(ENV_VAR, "").strip()
    if not raw:
        return NPDLossConfig()
    try:
        settings = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"{ENV_VAR} is not JSON ({e}): {raw!r}") from None
    if not isinstance(settings, dict) or set(settings) - set(ENV_KEYS):
        raise ValueError(f"{ENV_VAR} must be a JSON object with keys among {ENV_KEYS}, got {raw!r}")
    try:
        return NPDLossConfig(**settings)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{ENV_VAR}={raw!r}: {e}") from None


def compute_npd_topk_outputs(
    config: Any,
    distillation_config: Any,
    data: Any,
    student_logits: torch.Tensor,
    data_format: str,
) -> dict[str, torch.Tensor]:
    """Logits-processor half: per-token NPD loss and masses, each ``(1, total_nnz / sp_size)``.

    Same signature as verl's ``compute_topk_loss``. ``data_format`` is unused: the FSDP engine passes
    the packed ``(1, total_nnz, V)`` logits in both its remove-padding and padded branches.
    """
    from verl.utils.ulysses import get_ulysses_sequence_parallel_world_size, slice_input_tensor

    if config.strategy not in SUPPORTED_STRATEGIES:
        raise NotImplementedError(
            f"NPD distillation losses support the strategies {SUPPORTED_STRATEGIES}, got {config.strategy!r}"
        )
    loss_config = distillation_config.distillation_loss
    teacher_log_probs, teacher_ids = data["teacher_logprobs"], data["teacher_ids"]
    if not (teacher_log_probs.is_nested and teacher_ids.is_nested):
        raise ValueError("expected the teacher top-k as nested (no-padding) tensors, as verl's engine passes them")
    teacher_log_probs = teacher_log_probs.values().unsqueeze(0)  # (1, total_nnz, topk)
    teacher_ids = teacher_ids.values().unsqueeze(0)
    # The token predicted at t is input t + 1; verl rolls the whole packed row the same way for its
    # log-probs (each sample's last position then points into the next sample and is never in the loss).
    target_ids = torch.roll(data["input_ids"].values(), shifts=-1, dims=0).unsqueeze(0)
    if get_ulysses_sequence_parallel_world_size() > 1:
        teacher_log_probs = slice_input_tensor(teacher_log_probs, dim=1)
        teacher_ids = slice_input_tensor(teacher_ids, dim=1)
        target_ids = slice_input_tensor(target_ids, dim=1)

    if SPAN_KEY in data.keys():
        return _cross_tokenizer_outputs(data, student_logits, teacher_ids, teacher_log_probs, target_ids, loss_config)
    output = per_token_distillation_loss(
        student_logits=student_logits,
        teacher_topk_ids=teacher_ids,
        teacher_topk_log_probs=teacher_log_probs,
        loss_mode=LOSS_NAMES[loss_config.loss_mode],
        settings=env_settings(),
        target_ids=target_ids,
        topk=loss_config.topk,
        chunk_size=loss_config.chunked_topk_chunk_size,
    )
    return {
        LOSS_KEY: output.loss,
        STUDENT_MASS_KEY: output.student_topk_mass,
        TEACHER_MASS_KEY: output.teacher_topk_mass,
    }


def _cross_tokenizer_outputs(data, student_logits, teacher_ids, teacher_log_probs, target_ids, loss_config):
    """The NPD trainer's batches scored across tokenizers carry the per-row span (``SPAN_KEY``) and
    the ULD weight: :func:`verl_npd.losses.cross_tokenizer.cross_tokenizer_loss` instead."""
    from verl.utils import tensordict_utils as tu
    from verl.utils.ulysses import get_ulysses_sequence_parallel_world_size

    if get_ulysses_sequence_parallel_world_size() > 1:
        # A span's rows are scored together, and Ulysses would split them over ranks.
        raise NotImplementedError("npd.cross_tokenizer does not support Ulysses sequence parallelism")
    output = cross_tokenizer_loss(
        student_logits=student_logits,
        teacher_ids=teacher_ids,
        teacher_log_probs=teacher_log_probs,
        span=data[SPAN_KEY].values().unsqueeze(0),
        target_ids=target_ids,
        loss_mode=LOSS_NAMES[loss_config.loss_mode],
        settings=env_settings(),
        topk=loss_config.topk,
        chunk_size=loss_config.chunked_topk_chunk_size,
        uld_weight=float(tu.get_non_tensor_data(data=data, key=ULD_WEIGHT_KEY, default=None)),
    )
    return {
        LOSS_KEY: output.loss,
        STUDENT_MASS_KEY: output.student_topk_mass,
        TEACHER_MASS_KEY: output.teacher_topk_mass,
        ULD_KEY: output.uld,
    }


def compute_npd_distillation_loss(
    config: Any, distillation_config: Any, model_output: dict, data: Any
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Registered half: the logits-processor outputs in verl's ``(bsz, max_response_len)`` layout, plus metrics."""
    from verl.utils.metric import AggregationType, Metric
    from verl.workers.utils.padding import no_padding_2_padding

    missing = [key for key in (LOSS_KEY, STUDENT_MASS_KEY, TEACHER_MASS_KEY) if key not in model_output]
    if missing:
        raise RuntimeError(
            f"NPD loss outputs {missing} are missing from model_output: they are computed in the FSDP engine's "
            "logits processor, which fused kernels (use_fused_kernels=True) bypass; turn fused kernels off"
        )
    losses = no_padding_2_padding(model_output[LOSS_KEY], data)
    student_mass = no_padding_2_padding(model_output[STUDENT_MASS_KEY], data)
    teacher_mass = no_padding_2_padding(model_output[TEACHER_MASS_KEY], data)
    response_mask = data["response_mask"]
    response_mask = (response_mask.to_padded_tensor(0) if response_mask.is_nested else response_mask).bool()
    if not losses.shape == student_mass.shape == teacher_mass.shape == response_mask.shape:
        raise ValueError(f"shape mismatch: loss {losses.shape}, response_mask {response_mask.shape}")

    student_mass, teacher_mass = student_mass[response_mask], teacher_mass[response_mask]
    metrics: dict[str, Any] = {}
    if student_mass.numel():
        metrics = {
            "distillation/student_mass": student_mass.mean().item(),
            "distillation/student_mass_min": Metric(AggregationType.MIN, student_mass.min()),
            "distillation/teacher_mass": teacher_mass.mean().item(),
            "distillation/teacher_mass_min": Metric(AggregationType.MIN, teacher_mass.min()),
        }
    if ULD_KEY in model_output:
        uld = no_padding_2_padding(model_output[ULD_KEY], data)[response_mask]
        if uld.numel():
            metrics["npd/cross_tokenizer/uld"] = uld.mean().item()
    if "log_probs" in model_output and "rollout_log_probs" in data.keys():
        metrics["npd/drift_kl"] = Metric(AggregationType.SUM, _drift_sum(model_output, data, response_mask))
    return losses, metrics


def _drift_sum(model_output: dict, data: Any, response_mask: torch.Tensor) -> torch.Tensor:
    """This micro-batch's share of the drift ``mean(log p_B - log p_S_now)`` over the global batch's response tokens.

    The drift of docs/algorithm.md: the k1 estimate of KL(behaviour || current student), from the rollout's own
    log-probs and the student's sampled-token log-probs of this training forward (present when verl
    runs with ``distillation_only=False``), so it costs nothing extra. Like verl's loss metric it is
    the micro-batch sum / global token count * dp_size, aggregated with SUM, so summing micro-batches
    and averaging data-parallel ranks gives the token mean of the whole global batch.
    """
    from verl.workers.utils.padding import no_padding_2_padding

    student = no_padding_2_padding(model_output["log_probs"], data).detach()
    behaviour = data["rollout_log_probs"]
    behaviour = behaviour.to_padded_tensor(0.0) if behaviour.is_nested else behaviour
    drift = torch.where(response_mask, behaviour.to(student.dtype) - student, torch.zeros_like(student))
    return drift.sum() / data["batch_num_tokens"] * data["dp_size"]


def _patch_compute_topk_loss() -> None:
    """Route verl's top-k logits-processor call to :func:`compute_npd_topk_outputs` for the ``npd_*`` modes.

    verl/trainer/distillation/losses.py:123 (``compute_topk_loss``) always computes verl's own
    forward KL, whatever ``distillation_loss.loss_mode`` names: a registered top-k loss only ever
    sees verl's numbers. ``distillation_ppo_loss`` (:205) looks ``compute_topk_loss`` up in its
    module at call time, so replacing the module attribute reroutes the modes in ``LOSS_NAMES`` and
    leaves every other mode, verl's own included, to verl's function.
    """
    import verl.trainer.distillation.losses as verl_losses

    original = verl_losses.compute_topk_loss

    @functools.wraps(original)
    def compute_topk_loss(config, distillation_config, data, student_logits, data_format):
        if distillation_config.distillation_loss.loss_mode in LOSS_NAMES:
            return compute_npd_topk_outputs(config, distillation_config, data, student_logits, data_format)
        return original(config, distillation_config, data, student_logits, data_format)

    verl_losses.compute_topk_loss = compute_topk_loss


def register() -> None:
    """Register every ``npd_*`` loss with verl and install the logits-processor dispatch. Safe to call twice."""
    import verl.trainer.distillation.losses as verl_losses

    env_settings()  # fail at start-up, not at the first training step, on a malformed VERL_NPD_LOSS
    apply_once("topk_loss_dispatch", _patch_compute_topk_loss)
    names = []
    for name in LOSS_NAMES:
        registered = verl_losses.DISTILLATION_LOSS_REGISTRY.get(name)
        if registered is None:
            names.append(name)
        elif registered.__qualname__ != compute_npd_distillation_loss.__qualname__ or (
            registered.__module__ != compute_npd_distillation_loss.__module__
        ):
            raise ValueError(f"verl distillation loss {name!r} is already registered by {registered.__module__}")
    if names:
        settings = verl_losses.DistillationLossSettings(names=names, use_topk=True)
        verl_losses.register_distillation_loss(settings)(compute_npd_distillation_loss)
    logger.debug("verl-npd: distillation losses registered: %s", list(LOSS_NAMES))
