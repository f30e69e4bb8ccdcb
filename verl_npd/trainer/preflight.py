"""Checks that run before any Ray actor starts, so that a misconfigured run fails in seconds with
one line naming the field, file or row, instead of failing deep inside a worker or hanging in Ray.
``main_npd --check`` runs the same checks and lists every problem instead of stopping at the first
(:mod:`verl_npd.trainer.readiness`)."""

from __future__ import annotations

import json
import os
import re
import sys
import traceback
from typing import TYPE_CHECKING, NamedTuple

from omegaconf import DictConfig, OmegaConf

from verl_npd.platform.gpu_stack import gpu_stack_problems
from verl_npd.tokenizers import TokenizerError, check_shared_token_ids, load_tokenizer

if TYPE_CHECKING:
    from verl_npd.trainer.config import NPDConfig


class PreflightError(ValueError):
    """A configuration or input problem found before the run started."""


# What a failed check returns when problems are collected rather than raised.
FAILED = object()


class Problems:
    """Runs checks in order. A run stops at the first problem (``collect=False``: the check's
    PreflightError propagates); the readiness check (``main_npd --check``) collects every one."""

    def __init__(self, collect: bool):
        self.collect = collect
        self.found: list[str] = []

    def run(self, check, *args):
        """``check(*args)``'s result, or :data:`FAILED` once its problem is recorded."""
        try:
            return check(*args)
        except PreflightError as e:
            if not self.collect:
                raise
            self.found.append(str(e))
            return FAILED

    def report(self, problems: list[str]) -> list[str]:
        """Problems a check listed rather than raised (several independent ones); returns them."""
        if problems and not self.collect:
            raise PreflightError(problems[0])
        self.found.extend(problems)
        return problems


class Checked(NamedTuple):
    """What the preflight found: the ``npd:`` section, parsed once here for the whole run (None when
    it is invalid), and, with ``collect``, every problem."""

    npd: NPDConfig | None
    problems: list[str]


def preflight(config: DictConfig, *, gpu_memory_bytes: int | None = None, collect: bool = False) -> Checked:
    """Check the config and its inputs before anything starts. Raises the first problem, or with
    ``collect`` returns them all (a check whose input an earlier one rejected is skipped, so that a
    problem is named once). ``gpu_memory_bytes``: each GPU's memory, for the memory estimates
    (:mod:`verl_npd.trainer.memory`); None skips them."""
    if "npd" not in config:
        raise PreflightError("the config has no 'npd' section; extend verl_npd/config/npd_trainer.yaml")
    problems = Problems(collect)
    named = problems.run(check_named, config) is not FAILED
    sized = not problems.report(size_problems(config))
    npd = problems.run(npd_settings, config)
    if npd is not FAILED and sized:
        problems.run(check_token_budget, config, npd.packing.truncate)
        problems.run(check_buffer_holds_a_batch, config, npd.buffer.capacity)
    problems.run(check_distillation_enabled, config)
    problems.run(check_loss_chunk_size, config)
    problems.run(check_served_teacher_count, config)
    student_path, teacher_paths = FAILED, {}
    if named:
        student_path = problems.run(check_model_path, "actor_rollout_ref.model.path", config.actor_rollout_ref.model.path)
        for key, teacher in config.distillation.teacher_models.items():
            field_name = f"distillation.teacher_models.{key}.model_path"
            teacher_paths[field_name] = problems.run(check_model_path, field_name, teacher.model_path)
    for key in VERL_CONFIG_SECTIONS if sized else ():  # verl's sections interpolate the sizes
        problems.run(check_verl_section, config, key)
    tokenizer = FAILED if student_path is FAILED else problems.run(student_tokenizer, config, student_path)
    if tokenizer is not FAILED:
        for field_name, teacher_path in teacher_paths.items():
            if teacher_path is not FAILED:
                problems.run(check_teacher_tokenizer, config, field_name, teacher_path, tokenizer)
    prompt_key = config.data.get("prompt_key", "prompt")
    for field_name in ("data.train_files", "data.val_files") if named else ():
        paths = problems.run(check_data_files, field_name, config.data[field_name.split(".")[1]], prompt_key)
        if paths is not FAILED and tokenizer is not FAILED and sized:
            problems.run(check_prompt_lengths, field_name, paths, prompt_key, tokenizer, config.data)
    rollout = config.actor_rollout_ref.rollout
    problems.run(check_standalone_rollout, rollout)
    problems.run(check_colocated_rollout, rollout)
    problems.run(check_behaviour_log_probs, rollout)
    if sized:
        problems.run(check_max_model_len, config)
        problems.run(check_resources, config)
    problems.report(gpu_stack_problems(config))
    problems.run(check_wandb_login, config)
    if gpu_memory_bytes is not None and named and sized:
        problems.report(memory_problems(config, gpu_memory_bytes))
    if npd is not FAILED and tokenizer is not FAILED:
        problems.run(check_served_teacher, config, npd, tokenizer)
    return Checked(None if npd is FAILED else npd, problems.found)


# verl's sizes that it does not check before its workers use them: a batch of 0 fails after Ray
# has started, with PyTorch's sampler error that names no key; a length of 0 trains on nothing.
# (key, what null means where verl gives null a meaning)
SIZES = (
    ("data.train_batch_size", None),
    ("data.val_batch_size", "the whole validation set as one batch"),
    ("data.max_prompt_length", None),
    ("data.max_response_length", None),
    ("actor_rollout_ref.rollout.n", None),
    ("actor_rollout_ref.actor.ppo_mini_batch_size", None),
    ("actor_rollout_ref.actor.ppo_max_token_len_per_gpu", None),
    ("trainer.total_training_steps", "data.train_files' batches times trainer.total_epochs"),
)


def size_problems(config: DictConfig) -> list[str]:
    """Each of :data:`SIZES` is an integer of 1 or more (or null where verl gives null a meaning).
    A key that merely repeats another (``ppo_mini_batch_size: ${data.train_batch_size}``) is not
    named again when that one is wrong."""
    problems, wrong = [], set()
    for key, null_means in SIZES:
        parent, name = key.rsplit(".", 1)
        node = OmegaConf.select(config, parent)
        if node is None or name not in node:
            continue
        if OmegaConf.is_interpolation(node, name):
            written = OmegaConf.to_container(node, resolve=False)[name]
            if written.strip("${}") in wrong:
                continue
        value = node[name]
        if value is None and null_means:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            wrong.add(key)
            allowed = "an integer of 1 or more" + (f", or null for {null_means}" if null_means else "")
            problems.append(f"{key}={value!r}: must be {allowed}")
    return problems


def npd_settings(config: DictConfig):
    from verl_npd.trainer.config import NPDConfig

    try:
        return NPDConfig.from_mapping(OmegaConf.to_container(config.npd, resolve=True))
    except (ValueError, TypeError) as e:
        raise PreflightError(f"invalid config: {e}") from None


def check_distillation_enabled(config: DictConfig) -> None:
    if not config.distillation.enabled:
        raise PreflightError("distillation.enabled must be true: NPD distils from the configured teacher")


def check_loss_chunk_size(config: DictConfig) -> None:
    """The ``npd_*`` losses gather the student's log-probs in chunks of verl's
    ``chunked_topk_chunk_size`` tokens, which verl does not range-check (its own losses read it only
    with ``use_chunked_topk``): a bad value would stop the first training step."""
    from verl_npd.losses.verl_registration import LOSS_NAMES

    loss = config.distillation.distillation_loss
    chunk = loss.get("chunked_topk_chunk_size", 1)
    if loss.loss_mode in LOSS_NAMES and chunk < 1:
        raise PreflightError(
            f"distillation.distillation_loss.chunked_topk_chunk_size={chunk}: {loss.loss_mode} gathers the "
            "student's log-probs in chunks of this many tokens; set it to 1 or more (verl's default is 4096)"
        )


def check_served_teacher_count(config: DictConfig) -> None:
    if served_teacher_url(config) and len(config.distillation.teacher_models) != 1:
        raise PreflightError(
            f"npd.teacher.url serves one teacher, but distillation.teacher_models has "
            f"{len(config.distillation.teacher_models)} ({sorted(config.distillation.teacher_models)})"
        )


def student_tokenizer(config: DictConfig, student_path: str):
    try:
        return load_tokenizer(student_path, bool(config.actor_rollout_ref.model.get("trust_remote_code", False)))
    except TokenizerError as e:
        raise PreflightError(f"actor_rollout_ref.model.path: {e}") from None


def cross_tokenizer_enabled(config: DictConfig) -> bool:
    return bool(OmegaConf.select(config, "npd.cross_tokenizer.enabled", default=False))


def check_teacher_tokenizer(config: DictConfig, field_name: str, teacher_path: str, student) -> None:
    """The teacher is fed the student's token ids, so both need one vocabulary; across tokenizers
    (``npd.cross_tokenizer.enabled``) the teacher's own chat template must instead give an assistant
    header and an end-of-turn token, as the student's must."""
    trust = bool(config.actor_rollout_ref.model.get("trust_remote_code", False))
    try:
        teacher = load_tokenizer(teacher_path, trust)
    except TokenizerError as e:
        raise PreflightError(f"{field_name}: {e}") from None
    if cross_tokenizer_enabled(config):
        from verl_npd.filters.ifd import ChatTemplateError, TokenizerInfo
        from verl_npd.rollout.cross_tokenizer import CrossTokenizerError, end_of_turn_id

        kwargs = dict(config.data.get("apply_chat_template_kwargs", None) or {})
        for name, tokenizer in ((field_name, teacher), ("actor_rollout_ref.model.path", student)):
            try:
                TokenizerInfo.from_tokenizer(tokenizer, **kwargs)
                end_of_turn_id(tokenizer, **kwargs)
            except (ChatTemplateError, CrossTokenizerError) as e:
                raise PreflightError(f"{name}: npd.cross_tokenizer needs its chat template: {e}") from None
        return
    try:
        check_shared_token_ids(teacher, student)
    except TokenizerError as e:
        raise PreflightError(
            f"{field_name}: {e}; set npd.cross_tokenizer.enabled=true to distil across tokenizers"
        ) from None


def memory_problems(config: DictConfig, gpu_memory_bytes: int) -> list[str]:
    from verl_npd.trainer.memory import memory_needs

    needs, _ = memory_needs(config, gpu_memory_bytes)
    return [need.problem() for need in needs if not need.fits]


def check_token_budget(config: DictConfig, truncate: bool) -> None:
    """NPD packs each micro-batch to verl's ``ppo_max_token_len_per_gpu``; the longest sample the
    data allows must fit one, unless ``npd.packing.truncate`` cuts it (else the first long sample
    would stop the run mid-way)."""
    budget = config.actor_rollout_ref.actor.ppo_max_token_len_per_gpu
    longest = config.data.max_prompt_length + config.data.max_response_length
    if budget < longest and not truncate:
        raise PreflightError(
            f"actor_rollout_ref.actor.ppo_max_token_len_per_gpu={budget} (NPD's micro-batch token budget) is less "
            f"than the longest sample, data.max_prompt_length + data.max_response_length = {longest}; raise it, "
            "or set npd.packing.truncate=true to cut such samples to the budget"
        )


def check_buffer_holds_a_batch(config: DictConfig, capacity: int) -> None:
    """The trainer takes a step's samples from the near-policy buffer at once: a buffer that cannot
    hold them would never fill a batch."""
    samples_per_step = config.data.train_batch_size * config.actor_rollout_ref.rollout.n
    if capacity < samples_per_step:
        raise PreflightError(
            f"npd.buffer.capacity={capacity} cannot hold a training batch: data.train_batch_size * "
            f"actor_rollout_ref.rollout.n = {samples_per_step} samples; raise it to {samples_per_step} or more"
        )


def check_named(config: DictConfig) -> None:
    """What the base config leaves to the config extending it is set: the models and data (null in
    npd_trainer.yaml) and the rollout engine (``???`` in verl's ppo_trainer)."""
    required = ["actor_rollout_ref.model.path", "actor_rollout_ref.rollout.name", "data.train_files", "data.val_files"]
    required += [f"distillation.teacher_models.{key}.model_path" for key in config.distillation.teacher_models]
    unset = [key for key in required if _unset(config, key)]
    if unset:
        raise PreflightError(
            f"the config does not set {', '.join(unset)}: npd_trainer.yaml is a base that names no model, data "
            "or rollout engine; extend it (as verl_npd/config/npd_toy.yaml and the recipes do) or set them "
            "on the command line"
        )


def _unset(config: DictConfig, key: str) -> bool:
    parent, name = key.rsplit(".", 1)
    node = OmegaConf.select(config, parent)
    return OmegaConf.is_missing(node, name) or node[name] in (None, "")


def check_behaviour_log_probs(rollout: DictConfig) -> None:
    """The student's IFD divides the sampler's log-probs of its response (s_B(y|x)) by a prefill of
    the raw model (s_B(y), always at temperature 1). Both describe the same distribution only when
    the sampler reports raw log-probs or samples the raw distribution itself."""
    if rollout.get("logprobs_mode", "processed_logprobs") == "raw_logprobs":
        return
    top_k = rollout.get("top_k", -1)
    raw_sampling = rollout.temperature == 1.0 and rollout.get("top_p", 1.0) == 1.0 and top_k in (-1, 0, None)
    if not raw_sampling:
        raise PreflightError(
            f"actor_rollout_ref.rollout.temperature={rollout.temperature} (top_p={rollout.get('top_p', 1.0)}, "
            f"top_k={top_k}) with logprobs_mode={rollout.get('logprobs_mode')}: the sampler would report log-probs "
            "of the reshaped distribution, which the Δ-IFD filter divides by a raw prefill; set "
            "actor_rollout_ref.rollout.logprobs_mode=raw_logprobs or sample at temperature 1 without top-k/top-p"
        )


def check_standalone_rollout(rollout: DictConfig) -> None:
    """Standalone replicas (``rollout.nnodes > 0``) live in other processes or on other GPUs: the
    in-process ``naive`` weight sync cannot reach them."""
    if rollout.nnodes <= 0:
        return
    if rollout.n_gpus_per_node <= 0:
        raise PreflightError(
            f"actor_rollout_ref.rollout.n_gpus_per_node is {rollout.n_gpus_per_node}: a standalone rollout "
            f"(actor_rollout_ref.rollout.nnodes={rollout.nnodes}) needs GPUs (logical ones on CPU)"
        )
    if rollout.checkpoint_engine.backend == "naive":
        raise PreflightError(
            "actor_rollout_ref.rollout.checkpoint_engine.backend=naive cannot sync a standalone rollout "
            f"(actor_rollout_ref.rollout.nnodes={rollout.nnodes}); use nccl on GPUs or npd_gloo on CPU"
        )


def check_colocated_rollout(rollout: DictConfig) -> None:
    """A rollout colocated with the trainer (``rollout.nnodes=0``) shares the trainer's GPUs and is
    synced in-process (verl's ``naive`` engine: NCCL cannot connect two processes on one GPU). It
    generates while the trainer trains, so it must stay awake, and a sync cannot clear its vLLM
    prefix cache: verl
    calls vLLM's ``reset_prefix_cache`` without preempting running requests
    (verl/workers/rollout/vllm_rollout/vllm_async_server.py:864-870), and vLLM refuses to reset
    while any request holds cache blocks (``Scheduler.reset_prefix_cache``,
    vllm/v1/core/sched/scheduler.py), which NPD's always-busy replicas always do. Blocks computed
    with old weights would then be reused by new requests (npd_trainer.yaml turns caching off).
    A standalone rollout is synced after verl's ``abort_all_requests``, vLLM's
    ``pause_generation(clear_cache=True)``, which aborts every request first
    (vllm_async_server.py:931-995), so caching is safe there."""
    if rollout.nnodes > 0:
        return
    if rollout.checkpoint_engine.backend != "naive":
        raise PreflightError(
            f"actor_rollout_ref.rollout.checkpoint_engine.backend={rollout.checkpoint_engine.backend} with the "
            "rollout colocated with the trainer (actor_rollout_ref.rollout.nnodes=0): the trainer syncs its own "
            "GPUs' replicas in-process; set it to naive"
        )
    if rollout.free_cache_engine:
        raise PreflightError(
            "actor_rollout_ref.rollout.free_cache_engine=true with the rollout colocated with the trainer "
            "(actor_rollout_ref.rollout.nnodes=0): NPD generates while it trains, so the rollout must never "
            "sleep; set it to false (npd_trainer.yaml does)"
        )
    if rollout.name == "vllm" and rollout.get("enable_prefix_caching", False):
        raise PreflightError(
            "actor_rollout_ref.rollout.enable_prefix_caching=true with the student's vLLM colocated with the "
            "trainer (actor_rollout_ref.rollout.nnodes=0): a weight sync cannot reset the cache while NPD's "
            "requests run, so KV blocks of old weights would be reused; set it to false (npd_trainer.yaml does)"
        )


def check_max_model_len(config: DictConfig) -> None:
    """A rollout context shorter than the longest prompt and response would cut responses short of
    ``data.max_response_length`` (vLLM caps a request at ``max_model_len`` less its prompt,
    vllm_async_server.py:593-617)."""
    max_model_len = config.actor_rollout_ref.rollout.get("max_model_len")
    longest = config.data.max_prompt_length + config.data.max_response_length
    if max_model_len is not None and max_model_len < longest:
        raise PreflightError(
            f"actor_rollout_ref.rollout.max_model_len={max_model_len} is less than data.max_prompt_length + "
            f"data.max_response_length = {longest}; set it to {longest}"
        )


def check_wandb_login(config: DictConfig) -> None:
    """verl starts its trackers in ``fit``, after every worker and server is up; wandb without a
    login fails only then. Where wandb 0.31 looks for a login, in order
    (wandb/sdk/lib/wbauth/authenticate.py, ``_use_system_auth``): WANDB_API_KEY or
    WANDB_IDENTITY_TOKEN_FILE, then the netrc file (NETRC, else ~/.netrc) entry for its host; runs
    with WANDB_MODE=offline or disabled need none."""
    import netrc
    from urllib.parse import urlsplit

    if "wandb" not in list(config.trainer.get("logger") or []):
        return
    if os.environ.get("WANDB_MODE") in ("offline", "disabled", "dryrun"):
        return
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return
    host = urlsplit(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).netloc
    netrc_path = os.path.expanduser(os.environ.get("NETRC") or "~/.netrc")
    try:
        if netrc.netrc(netrc_path).authenticators(host):
            return
    except (OSError, netrc.NetrcParseError):
        pass
    raise PreflightError(
        f"trainer.logger includes wandb, but wandb has no login here (no WANDB_API_KEY, no {host} entry in "
        f"{netrc_path}), and it would fail only once every worker is up: run `wandb login`, set "
        "WANDB_MODE=offline, or log with trainer.logger='[console,tensorboard]'"
    )


WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
# What a Hugging Face model directory needs, each as the files that can provide it.
MODEL_PARTS = {
    "config": ("config.json",),
    "tokenizer": ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt"),
    "weights": ("model.safetensors", "pytorch_model.bin", *WEIGHT_INDEXES),
}


def check_model_path(field_name: str, path: str | None) -> str:
    """A local model directory must exist and hold a config, a tokenizer and readable weights; a hub
    id (org/name) is left to verl."""
    if not path:
        raise PreflightError(f"{field_name} is not set")
    expanded = os.path.expanduser(str(path))
    looks_local = expanded.startswith((os.sep, ".")) or os.path.exists(expanded)
    if not looks_local:
        return str(path)
    if not os.path.isdir(expanded):
        raise PreflightError(f"{field_name}: model directory {path!r} does not exist")
    missing = [
        f"no {part} ({' or '.join(names)})"
        for part, names in MODEL_PARTS.items()
        if not any(os.path.isfile(os.path.join(expanded, name)) for name in names)
    ]
    if missing:
        raise PreflightError(f"{field_name}: model directory {path!r} has {' and '.join(missing)}")
    try:
        with open(os.path.join(expanded, "config.json")) as f:
            json.load(f)
    except (OSError, ValueError) as e:
        raise PreflightError(f"{field_name}: cannot read {os.path.join(str(path), 'config.json')!r}: {e}") from None
    problem = weights_problem(expanded)
    if problem:
        raise PreflightError(f"{field_name}: model directory {path!r}: {problem}")
    return expanded


def weights_problem(model_dir: str) -> str | None:
    """What is wrong with the weights: an index's missing shards, or a safetensors file whose header
    is unreadable or does not cover the file (truncated). Reads file headers only."""
    index_name = next((name for name in WEIGHT_INDEXES if os.path.isfile(os.path.join(model_dir, name))), None)
    if index_name is None:
        return safetensors_problem(model_dir, "model.safetensors")
    try:
        with open(os.path.join(model_dir, index_name)) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
    except (OSError, ValueError, KeyError, AttributeError) as e:
        return f"cannot read the shard list of {index_name}: {e!r}"
    absent = [shard for shard in shards if not os.path.isfile(os.path.join(model_dir, shard))]
    if absent:
        return f"{index_name} lists {len(shards)} shards, {len(absent)} missing: {', '.join(absent)}"
    return next(filter(None, (safetensors_problem(model_dir, shard) for shard in shards)), None)


def safetensors_problem(model_dir: str, name: str) -> str | None:
    """Why ``name`` (if it is a safetensors file in ``model_dir``) cannot be read, else None."""
    if not name.endswith(".safetensors") or not os.path.isfile(os.path.join(model_dir, name)):
        return None
    from safetensors import safe_open

    try:
        # safe_open parses the header and checks that its tensors exactly cover the file.
        with safe_open(os.path.join(model_dir, name), framework="np"):
            return None
    except Exception as e:  # noqa: BLE001 - any unreadable file is reported with its name
        return f"{name} is not a readable safetensors file (truncated or corrupt?): {e}"


# The config sections that verl turns into its config dataclasses during an NPD run, where their
# ``__post_init__`` checks run inside Ray: the model (our task runner, engine_workers.py:540),
# actor (engine_workers.py:593), rollout and its checkpoint engine (engine_workers.py:651, :679)
# and distillation (ray_trainer.py:934).
VERL_CONFIG_SECTIONS = (
    "actor_rollout_ref.model",
    "actor_rollout_ref.actor",
    "actor_rollout_ref.rollout",
    "distillation",
)


def check_verl_config(config: DictConfig) -> None:
    """Build verl's config dataclasses from the composed config as verl will, so that a value verl
    rejects fails here, named by its full key, rather than in a worker after Ray has started."""
    for key in VERL_CONFIG_SECTIONS:
        check_verl_section(config, key)


def check_verl_section(config: DictConfig, key: str) -> None:
    """One section of :data:`VERL_CONFIG_SECTIONS`, built as verl builds it. Importing verl loads
    our plugin first, so our loss modes, engines and patches are in place."""
    from verl.utils.config import omega_conf_to_dataclass

    section = OmegaConf.select(config, key)
    try:
        omega_conf_to_dataclass(section)
    except Exception as error:  # noqa: BLE001 - whatever verl raises is reported with the key
        raise PreflightError(describe_verl_config_error(*deepest_failure(key, section, error))) from None


def deepest_failure(key: str, section: DictConfig, error: Exception) -> tuple[str, DictConfig, Exception]:
    """``section`` (at ``key``) failed to build with ``error``; find the deepest section under it that
    fails on its own (building a section builds its sub-sections first)."""
    from verl.utils.config import omega_conf_to_dataclass

    for child_key, child in target_sections(section, key):
        try:
            omega_conf_to_dataclass(child)
        except Exception as child_error:  # noqa: BLE001
            return deepest_failure(child_key, child, child_error)
    return key, section, error


def target_sections(node: DictConfig, key: str):
    """The nearest sections below ``node`` that name a dataclass (``_target_``), with their keys."""
    for name, child in node.items_ex(resolve=False):
        if isinstance(child, DictConfig):
            if "_target_" in child:
                yield f"{key}.{name}", child
            else:
                yield from target_sections(child, f"{key}.{name}")


def describe_verl_config_error(key: str, section: DictConfig, error: Exception) -> str:
    """One line: the full key of the field the error names (else of the section), and verl's reason."""
    from hydra.errors import InstantiationException

    cause = error.__cause__ if isinstance(error, InstantiationException) and error.__cause__ else error
    reason = " ".join(str(cause).split())
    if not reason:  # a bare ``assert``: its source line says what was checked
        reason = f"{type(cause).__name__}: {traceback.extract_tb(cause.__traceback__)[-1].line}"
    field = first_named_field(section, reason)
    where = f"{key}.{field}" if field else key
    return f"{where}: {reason} (verl's {section._target_.rsplit('.', 1)[-1]})"


def first_named_field(section: DictConfig, text: str) -> str | None:
    """The field of ``section`` that ``text`` mentions first, spelled as its name or as words
    (``loss_mode`` or "loss mode"); the longest name wins a tie."""
    found = []
    for name in section.keys():
        if str(name).startswith("_"):
            continue
        for spelling in {str(name), str(name).replace("_", " ")}:
            match = re.search(rf"(?<!\w){re.escape(spelling)}(?!\w)", text, re.IGNORECASE)
            if match:
                found.append((match.start(), -len(str(name)), str(name)))
    return min(found)[2] if found else None


def check_data_files(field_name: str, files, prompt_key: str) -> list[str]:
    """Every file exists, is parquet, has rows and the prompt column; returns the expanded paths."""
    import pyarrow.parquet as pq

    paths = [files] if isinstance(files, str) else list(files)
    if not paths:
        raise PreflightError(f"{field_name} is empty")
    for path in paths:
        expanded = os.path.expanduser(str(path))
        if not os.path.isfile(expanded):
            raise PreflightError(f"{field_name}: data file {path!r} does not exist")
        try:
            parquet = pq.ParquetFile(expanded)
        except Exception as e:  # noqa: BLE001
            raise PreflightError(f"{field_name}: cannot read {path!r} as parquet: {e}") from None
        if parquet.metadata.num_rows == 0:
            raise PreflightError(f"{field_name}: {path!r} has no rows")
        columns = parquet.schema_arrow.names
        if prompt_key not in columns:
            raise PreflightError(
                f"{field_name}: {path!r} has no prompt column {prompt_key!r} (data.prompt_key); columns: {columns}"
            )
    return [os.path.expanduser(str(path)) for path in paths]


def check_prompt_lengths(field_name: str, paths: list[str], prompt_key: str, tokenizer, data: DictConfig) -> None:
    """Prompts longer than ``data.max_prompt_length`` (rendered as verl renders them) are skipped
    and counted when ``data.filter_overlong_prompts`` is set, truncated and counted under
    ``data.truncation`` left/right/middle, and otherwise (``truncation=error``) an error naming
    the first such row, before verl would fail on it mid-run."""
    import pyarrow.parquet as pq

    from verl_npd.filters.ifd import render_chat_ids

    limit = data.max_prompt_length
    chat_kwargs = dict(data.get("apply_chat_template_kwargs", None) or {})
    for path in paths:
        prompts = pq.read_table(path, columns=[prompt_key]).column(prompt_key).to_pylist()
        too_long = []
        for row, messages in enumerate(prompts):
            length = len(render_chat_ids(tokenizer, messages, add_generation_prompt=True, **chat_kwargs))
            if length > limit:
                too_long.append((row, length))
        if not too_long:
            continue
        what = f"{field_name}: {len(too_long)} of {len(prompts)} prompts in {path!r} are longer than " \
            f"data.max_prompt_length={limit}"
        if data.filter_overlong_prompts:
            if len(too_long) == len(prompts):
                raise PreflightError(f"{what}: nothing is left once they are skipped")
            print(f"verl-npd: {what}; they are skipped (data.filter_overlong_prompts=true)", file=sys.stderr)
        elif data.truncation == "error":
            row, length = too_long[0]
            raise PreflightError(
                f"{what} (first: row {row}, {length} tokens); set data.filter_overlong_prompts=true to skip "
                f"them, or raise data.max_prompt_length"
            )
        else:
            print(f"verl-npd: {what}; they are truncated (data.truncation={data.truncation})", file=sys.stderr)


def served_teacher_url(config: DictConfig) -> str | None:
    """``npd.teacher.url``: the teacher is served outside the job and takes none of its resources."""
    return config.get("npd", {}).get("teacher", {}).get("url")


def plan_resources(config: DictConfig) -> dict[str, int]:
    """The GPUs (logical ones on CPU) of each pool verl will ask Ray for, after checking that verl
    can split every pool and batch the way it will try to. Pure arithmetic on the config: it
    starts nothing and works for verl's own ``main_ppo`` configs too.

    - trainer: ``trainer.n_gpus_per_node * trainer.nnodes`` FSDP ranks, in data-parallel groups
      of ``ulysses_sequence_parallel_size``; verl hands each data-parallel rank an equal chunk of
      every batch, so the samples per step must divide evenly;
    - teacher: ``distillation.n_gpus_per_node * distillation.nnodes``, split into replicas by
      verl's own ``DistillationConfig`` (its checks run here); none for a teacher served at
      ``npd.teacher.url``;
    - standalone rollout (``rollout.nnodes > 0``): ``rollout.n_gpus_per_node * rollout.nnodes``,
      one replica per ``tensor_model_parallel_size`` GPUs; a colocated rollout splits the trainer
      pool the same way.
    """
    from verl.utils.config import omega_conf_to_dataclass

    rollout = config.actor_rollout_ref.rollout
    trainer_gpus = config.trainer.n_gpus_per_node * config.trainer.nnodes
    pools = {
        "trainer": trainer_gpus,
        "teacher": config.distillation.n_gpus_per_node * config.distillation.nnodes
        if config.distillation.enabled and not served_teacher_url(config)
        else 0,
        "standalone rollout": rollout.n_gpus_per_node * max(rollout.nnodes, 0),
    }
    if trainer_gpus < 1:
        raise PreflightError(
            f"the trainer pool is empty: trainer.n_gpus_per_node={config.trainer.n_gpus_per_node}, "
            f"trainer.nnodes={config.trainer.nnodes}"
        )
    sequence_parallel = config.actor_rollout_ref.actor.get("ulysses_sequence_parallel_size", 1)
    if trainer_gpus % sequence_parallel:
        raise PreflightError(
            f"the trainer's {trainer_gpus} GPUs cannot form groups of "
            f"actor_rollout_ref.actor.ulysses_sequence_parallel_size={sequence_parallel}"
        )
    data_parallel = trainer_gpus // sequence_parallel
    samples_per_step = config.data.train_batch_size * rollout.n
    if samples_per_step % data_parallel:
        raise PreflightError(
            f"data.train_batch_size * actor_rollout_ref.rollout.n = {samples_per_step} samples per step cannot be "
            f"split evenly over the trainer's {data_parallel} data-parallel ranks (trainer.n_gpus_per_node * "
            f"trainer.nnodes / ulysses_sequence_parallel_size); make it a multiple of {data_parallel}"
        )
    replica_gpus = rollout.tensor_model_parallel_size
    rollout_pool, rollout_fields = (
        (pools["standalone rollout"], "actor_rollout_ref.rollout.n_gpus_per_node * actor_rollout_ref.rollout.nnodes")
        if rollout.nnodes > 0
        else (trainer_gpus, "trainer.n_gpus_per_node * trainer.nnodes (the rollout is colocated)")
    )
    if rollout_pool % replica_gpus:
        raise PreflightError(
            f"the rollout's {rollout_pool} GPUs ({rollout_fields}) are not a multiple of "
            f"actor_rollout_ref.rollout.tensor_model_parallel_size={replica_gpus}"
        )
    if config.distillation.enabled:
        from hydra.errors import InstantiationException

        try:
            omega_conf_to_dataclass(config.distillation)
        except (InstantiationException, ValueError) as e:
            raise PreflightError(f"distillation: {e.__cause__ or e}") from None
    return pools


def check_resources(config: DictConfig) -> None:
    """verl asks Ray for one GPU (logical on CPU) per trainer, teacher and standalone rollout worker
    (none for a teacher served at ``npd.teacher.url``).

    Joining a running cluster (``ray_kwargs.ray_init.address`` or ``RAY_ADDRESS``), the cluster's
    own resources count; they are checked when verl places its pools (:mod:`verl_npd.platform.resource_check`).
    """
    from verl.utils.device import get_device_name

    rollout = config.actor_rollout_ref.rollout
    pools = plan_resources(config)
    needed = sum(pools.values())
    breakdown = " + ".join(f"{name} {count}" for name, count in pools.items() if count)
    ray_init = config.get("ray_kwargs", {}).get("ray_init", {})
    if ray_init.get("address") or os.environ.get("RAY_ADDRESS"):
        return
    if get_device_name() == "cpu" and config.trainer.device == "cpu":
        declared = ray_init.get("num_gpus")
        if declared is None or declared < needed:
            raise PreflightError(
                f"this CPU run needs {needed} logical GPUs ({breakdown}) but ray_kwargs.ray_init.num_gpus is "
                f"{declared}; set +ray_kwargs.ray_init.num_gpus={needed}"
            )
        return
    if config.trainer.nnodes == 1 and config.distillation.nnodes <= 1 and rollout.nnodes <= 1:
        available = cuda_gpus_here()
        if available < needed:
            raise PreflightError(
                f"this run needs {needed} GPUs ({breakdown}) but this node has {available} "
                f"(trainer.device={config.trainer.device})"
            )


def cuda_gpus_here() -> int:
    """The CUDA GPUs this process sees (``CUDA_VISIBLE_DEVICES`` applies)."""
    import torch

    return torch.cuda.device_count()


def check_served_teacher(config: DictConfig, npd, student_tokenizer) -> None:
    """Each server at ``npd.teacher.url`` answers, serves the named model with the student's tokenizer
    and returns the loss's top-k (:mod:`verl_npd.rollout.teacher_probe`); last, since it asks the
    network."""
    served = npd.teacher
    if not served.urls:
        return
    from verl_npd.rollout.remote_teacher import teacher_api_key
    from verl_npd.rollout.teacher_probe import TeacherProbeError, probe_served_teacher

    if npd.cross_tokenizer.enabled:
        # The served teacher reads its own tokens: its tokenizer is the one at its model_path.
        (teacher,) = config.distillation.teacher_models.values()
        trust = bool(config.actor_rollout_ref.model.get("trust_remote_code", False))
        try:
            student_tokenizer = load_tokenizer(teacher.model_path, trust)
        except TokenizerError as e:
            raise PreflightError(f"distillation.teacher_models: {e}") from None

    try:
        probe_served_teacher(
            served.urls,
            served.api,
            served.model,
            teacher_api_key(served.api_key_env),
            config.distillation.distillation_loss.topk,
            student_tokenizer,
            served.probe_timeout_s,
            whose="teacher" if npd.cross_tokenizer.enabled else "student",
        )
    except (TeacherProbeError, ValueError) as e:
        raise PreflightError(str(e)) from None
