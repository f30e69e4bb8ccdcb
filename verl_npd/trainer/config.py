"""The ``npd:`` section of the trainer config, as dataclasses with help text and defaults.

Everything else (models, data, optimiser, rollout engine, teacher, resources, logging) is verl's own
``ppo_trainer`` config, which the NPD trainer reads unchanged. verl turns its own sections into
dataclasses that reject unknown fields, which is why NPD's settings live under a new top-level key.
"""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass

from verl_npd.filters.delta_ifd import DeltaIFDFilterConfig
from verl_npd.losses.distill import NPDLossConfig
from verl_npd.rollout.buffer import STALE_POLICIES
from verl_npd.rollout.teacher_api import TEACHER_APIS


# Settings that have one home, in verl's config, which NPD reads (a run naming the old key is told).
MOVED_TO_VERL = {
    "npd.total_steps": "trainer.total_training_steps",
    "npd.packing.token_budget": "actor_rollout_ref.actor.ppo_max_token_len_per_gpu",
    "npd.loss.chunk_size": "distillation.distillation_loss.chunked_topk_chunk_size",
}


def from_mapping(cls, values: Mapping | None, prefix: str):
    """Build dataclass ``cls`` from a plain mapping, its nested dataclass fields from nested
    mappings, naming unknown keys with their full config path (``npd.buffer: unknown field(s) ...``)."""
    values = dict(values or {})
    known = {f.name: f for f in fields(cls)}
    for name in values:
        moved = MOVED_TO_VERL.get(f"{prefix}.{name}")
        if moved:
            raise ValueError(f"{prefix}.{name} is verl's {moved} (NPD reads verl's key); set that instead")
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"{prefix}: unknown field(s) {unknown}; known fields: {sorted(known)}")
    hints = typing.get_type_hints(cls)
    for name, spec in known.items():
        if name not in values:
            continue
        nested = spec.default_factory
        if nested is not MISSING and is_dataclass(nested):
            if not isinstance(values[name], Mapping):
                raise ValueError(f"{prefix}.{name}={values[name]!r}: must be a section of settings (a mapping)")
            values[name] = from_mapping(nested, values[name], f"{prefix}.{name}")
        elif not has_type(values[name], hints[name]):
            # Checked here because __post_init__'s range checks would fail on a wrong type with an
            # error that names no key ('<' not supported between 'str' and 'int').
            raise ValueError(f"{prefix}.{name}={values[name]!r}: must be {type_text(hints[name])}")
    return cls(**values)


def has_type(value, hint) -> bool:
    """Whether a value read from YAML or the command line is of a field's annotated type (the
    annotations in this package: int, float, bool, str, None, Literal, list[...] and unions of them)."""
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(has_type(value, arg) for arg in typing.get_args(hint))
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, (list, tuple)) and all(has_type(v, item) for v in value)
    if hint is type(None):
        return value is None
    if hint is float:  # YAML reads 1 as an int
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


TYPE_TEXTS = {int: "an integer", float: "a number", bool: "true or false", str: "a string", type(None): "null"}


def type_text(hint) -> str:
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        return f"one of {list(typing.get_args(hint))}"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_text(arg) for arg in typing.get_args(hint))
    if origin is list:
        return f"a list of {type_text(typing.get_args(hint)[0]).removeprefix('a ').removeprefix('an ')}s"
    return TYPE_TEXTS[hint]


def unknown_setting(key: str) -> str | None:
    """For a command-line override of ``key`` (``npd.buffer.capacity``), what is wrong with the key:
    a moved setting, or one NPD does not have, with the nearest known one; None when it exists.
    Hydra would refuse an unknown key too, but in several lines that do not say what is known."""
    moved = MOVED_TO_VERL.get(key)
    if moved:
        return f"{key} is verl's {moved} (NPD reads verl's key); set that instead"
    cls, path = NPDConfig, "npd"
    for name in key.split(".")[1:]:
        known = {f.name: f for f in fields(cls)}
        if name not in known:
            near = difflib.get_close_matches(name, known, n=1)
            hint = f"did you mean {path}.{near[0]}? " if near else ""
            return f"{path}.{name}: NPD has no such setting; {hint}{path} has {sorted(known)}"
        nested = known[name].default_factory
        if nested is MISSING or not is_dataclass(nested):
            return None  # a leaf: what follows indexes its value (a list of URLs)
        cls, path = nested, f"{path}.{name}"
    return None


@dataclass
class BufferConfig:
    """``npd.buffer``: the near-policy buffer between the generator and the trainer."""

    capacity: int = field(
        default=256,
        metadata={"help": "Samples queued or being generated at most; a full buffer pauses generation."},
    )
    max_staleness: int = field(
        default=2,
        metadata={
            "help": "Most policy versions a trained-on sample may lag the weights it is trained with. "
            "0 with sync_interval=1 is exactly on-policy; >= sync_interval lets generation run across syncs."
        },
    )
    stale_policy: str = field(
        default="wait",
        metadata={
            "help": "'wait': never start a sample that would be too stale (the generator waits for a sync); "
            "'drop': generate ahead and drop (and count) samples that are too stale when reached."
        },
    )

    def __post_init__(self):
        # That it holds a batch, data.train_batch_size * actor_rollout_ref.rollout.n samples, is the
        # preflight's check (check_buffer_holds_a_batch): those keys are verl's.
        if self.capacity < 1:
            raise ValueError(f"npd.buffer.capacity must be >= 1, got {self.capacity}")
        if self.max_staleness < 0:
            raise ValueError(f"npd.buffer.max_staleness must be >= 0, got {self.max_staleness}")
        if self.stale_policy not in STALE_POLICIES:
            raise ValueError(f"npd.buffer.stale_policy must be one of {STALE_POLICIES}, got {self.stale_policy!r}")


@dataclass
class AdaptiveSyncConfig:
    """``npd.adaptive_sync``: sync early when the rollout policy drifts (beyond the paper)."""

    enabled: bool = field(default=False, metadata={"help": "Also sync when measured drift passes the threshold."})
    drift_kl_threshold: float = field(
        default=0.05,
        metadata={"help": "npd/drift_kl (k1 KL of behaviour to current student, per token) that triggers a sync."},
    )

    def __post_init__(self):
        if self.drift_kl_threshold <= 0:
            raise ValueError(f"npd.adaptive_sync.drift_kl_threshold must be > 0, got {self.drift_kl_threshold}")


@dataclass
class GenerationConfig:
    """``npd.generation``: the asynchronous generator."""

    max_concurrent_prompts: int = field(
        default=128,
        metadata={
            "help": "Prompts in flight at once (generation + teacher scoring), in waves of a batch's worth of "
            "prompts plus those the filter is expected to drop (one wave when it is at most a batch); "
            "bounded by the buffer too."
        },
    )
    request_timeout_s: float = field(
        default=300.0, metadata={"help": "Seconds before a rollout or teacher request is retried."}
    )
    max_retries: int = field(
        default=2, metadata={"help": "Retries of a timed-out or failed request before the run fails."}
    )

    def __post_init__(self):
        if self.max_concurrent_prompts < 1:
            raise ValueError(f"npd.generation.max_concurrent_prompts must be >= 1, got {self.max_concurrent_prompts}")
        if self.request_timeout_s <= 0:
            raise ValueError(f"npd.generation.request_timeout_s must be > 0, got {self.request_timeout_s}")
        if self.max_retries < 0:
            raise ValueError(f"npd.generation.max_retries must be >= 0, got {self.max_retries}")


@dataclass
class TeacherConfig:
    """``npd.teacher``: a teacher served elsewhere (vLLM's completions API or SGLang's generate API)
    instead of verl's teacher replicas. ``distillation.teacher_models`` still names the one teacher:
    its loss settings, and its ``model_path`` for the tokenizer that preflight compares with the
    student's."""

    url: str | list[str] | None = field(
        default=None,
        metadata={
            "help": "The served teacher: one URL or a list of URLs of servers of the same teacher, among which "
            "scoring is balanced (a server that fails is skipped until it answers again). vLLM: the API base, "
            "e.g. http://host:8000/v1; SGLang: the server, e.g. http://host:30000. null: teacher replicas in "
            "this job. With a URL no GPU (or logical GPU) is reserved for the teacher."
        },
    )
    api: str = field(
        default="vllm",
        metadata={"help": "The servers' API: 'vllm' (POST {url}/completions) or 'sglang' (POST {url}/generate)."},
    )
    model: str | None = field(
        default=None,
        metadata={
            "help": "The served model's name (vLLM's --served-model-name); null: the server's only one (preflight "
            "names the served models when there are several)."
        },
    )
    api_key_env: str | None = field(
        default=None, metadata={"help": "Name of an environment variable holding the API key; null: no key."}
    )
    max_concurrency: int = field(
        default=8, metadata={"help": "Scoring requests in flight to each teacher server at once."}
    )
    max_tokens_per_request: int = field(
        default=4096,
        metadata={
            "help": "Tokens per scoring request: a wave's sequences go in requests of up to this many prompt "
            "tokens (a longer sequence alone), which the server prefills together."
        },
    )
    max_wait_s: float = field(
        default=600.0,
        metadata={
            "help": "How long a scoring request waits (probing with backoff) while no teacher server is up "
            "(unreachable, restarting or overloaded), before the run fails."
        },
    )
    probe_timeout_s: float = field(
        default=10.0,
        metadata={
            "help": "Seconds each probe of a teacher server waits for an answer: the preflight's (reachable, "
            "model, tokenizer, log-prob cap) and the health checks of a server that failed."
        },
    )
    gpu_memory_share: float = field(
        default=0.0,
        metadata={
            "help": "Share of each trainer GPU's memory the served teacher holds when it runs on those same GPUs "
            "(its vllm serve --gpu-memory-utilization, as in the one-GPU recipe); 0: it runs on GPUs of its own. "
            "The preflight counts it out of the trainer's memory."
        },
    )

    def __post_init__(self):
        if self.url is not None:
            urls = [self.url] if isinstance(self.url, str) else list(self.url)
            if not urls:
                raise ValueError("npd.teacher.url is an empty list; give one URL, a list of them, or null")
            for url in urls:
                if not isinstance(url, str) or not url.startswith(("http://", "https://")):
                    raise ValueError(f"npd.teacher.url must start with http:// or https://, got {url!r}")
            normalized = [url.rstrip("/") for url in urls]
            if len(set(normalized)) < len(normalized):
                raise ValueError(f"npd.teacher.url lists a server twice: {urls}")
        if self.api not in TEACHER_APIS:
            raise ValueError(f"npd.teacher.api must be one of {sorted(TEACHER_APIS)}, got {self.api!r}")
        if self.max_concurrency < 1:
            raise ValueError(f"npd.teacher.max_concurrency must be >= 1, got {self.max_concurrency}")
        if self.max_tokens_per_request < 1:
            raise ValueError(f"npd.teacher.max_tokens_per_request must be >= 1, got {self.max_tokens_per_request}")
        if self.max_wait_s <= 0:
            raise ValueError(f"npd.teacher.max_wait_s must be > 0, got {self.max_wait_s}")
        if not 0.0 <= self.gpu_memory_share < 1.0:
            raise ValueError(f"npd.teacher.gpu_memory_share must lie in [0, 1), got {self.gpu_memory_share}")
        if self.probe_timeout_s <= 0:
            raise ValueError(f"npd.teacher.probe_timeout_s must be > 0, got {self.probe_timeout_s}")

    @property
    def urls(self) -> list[str]:
        """``url`` as a list of servers (empty: teacher replicas in the job)."""
        if self.url is None:
            return []
        return [u.rstrip("/") for u in ([self.url] if isinstance(self.url, str) else self.url)]


@dataclass
class PackingConfig:
    """``npd.packing``: best-fit-decreasing packing of filtered samples into micro-batches of verl's
    ``actor_rollout_ref.actor.ppo_max_token_len_per_gpu`` tokens (prompt + response of every
    sample in it), the budget verl's own dynamic micro-batching uses."""

    truncate: bool = field(
        default=False,
        metadata={"help": "Truncate a sample longer than the token budget instead of failing with an error."},
    )


@dataclass
class CrossTokenizerConfig:
    """``npd.cross_tokenizer``: distil from a teacher whose tokenizer differs from the student's
    (docs/algorithm.md, "Across tokenizers")."""

    enabled: bool = field(
        default=False,
        metadata={
            "help": "Score each sample in the teacher's own tokens: the student's response is decoded, the prompt's "
            "messages rendered with the teacher's chat template and the text re-tokenised with the teacher's "
            "tokenizer; the teacher's top-k is mapped back onto the student's tokens by character offsets (each "
            "candidate on the student token its text starts with, given what is already written). The loss is "
            "the configured loss on the candidates the student can write plus uld_weight times ULD where it "
            "cannot (student tokens that cross the teacher's, byte pieces). Needed when the teacher's vocabulary "
            "differs from the student's; with the same tokenizer it gives the same loss as without it."
        },
    )
    uld_weight: float = field(
        default=1.0,
        metadata={
            "help": "Weight of the ULD term (L1 distance of the sorted probabilities of the teacher's entries the "
            "student cannot write and the student's largest probabilities) against the configured loss on the "
            "entries it can. 0 trains only on the latter."
        },
    )

    def __post_init__(self):
        if not 0.0 <= self.uld_weight < float("inf"):
            raise ValueError(f"npd.cross_tokenizer.uld_weight must be a finite number >= 0, got {self.uld_weight}")


@dataclass
class NPDConfig:
    """``npd``: Near-Policy Distillation settings (see docs/algorithm.md)."""

    sync_interval: int = field(
        default=2, metadata={"help": "Optimizer steps between weight syncs to the rollout engine (K)."}
    )
    output_dir: str = field(
        default="outputs/npd", metadata={"help": "Where summary.json, the metrics history and plots are written."}
    )
    verbose: bool = field(
        default=False,
        metadata={
            "help": "Print everything (Ray's and verl's output, every metric) to the console; by default it goes "
            "to run.log in output_dir and the console shows a progress bar, validations and the summary."
        },
    )
    shutdown_timeout_s: float = field(
        default=600.0,
        metadata={"help": "On SIGTERM/SIGINT, seconds to finish the current step and checkpoint before exiting."},
    )
    max_nonfinite_steps: int = field(
        default=3,
        metadata={
            "help": "Steps in a row whose gradient norm is not finite (verl skips their updates) after which the run "
            "stops with an error and a checkpoint; each such step is counted in npd/nonfinite_steps (since the run "
            "started or resumed)."
        },
    )
    teacher_accuracy: float | None = field(
        default=None,
        metadata={
            "help": "The teacher's validation accuracy when known (the toy demo passes the one measured when its "
            "teacher was built): a reference line in the summary and accuracy.png; null: not shown."
        },
    )
    buffer: BufferConfig = field(default_factory=BufferConfig)
    adaptive_sync: AdaptiveSyncConfig = field(default_factory=AdaptiveSyncConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    filter: DeltaIFDFilterConfig = field(default_factory=DeltaIFDFilterConfig)
    packing: PackingConfig = field(default_factory=PackingConfig)
    loss: NPDLossConfig = field(default_factory=NPDLossConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    cross_tokenizer: CrossTokenizerConfig = field(default_factory=CrossTokenizerConfig)

    def __post_init__(self):
        if self.shutdown_timeout_s <= 0:
            raise ValueError(f"npd.shutdown_timeout_s must be > 0, got {self.shutdown_timeout_s}")
        if self.teacher_accuracy is not None and not 0.0 <= self.teacher_accuracy <= 1.0:
            raise ValueError(f"npd.teacher_accuracy must lie in [0, 1] (or be null), got {self.teacher_accuracy}")
        if self.sync_interval < 1:
            raise ValueError(f"npd.sync_interval must be >= 1, got {self.sync_interval}")
        if self.max_nonfinite_steps < 1:
            raise ValueError(f"npd.max_nonfinite_steps must be >= 1, got {self.max_nonfinite_steps}")
        # The rollout engine holds version K * floor(c / K) when the trainer consumes with weights of
        # version c (K = sync_interval), so the freshest sample available then is up to K - 1 versions
        # old: a smaller bound could starve the trainer.
        if self.sync_interval - 1 > self.buffer.max_staleness:
            raise ValueError(
                f"npd.sync_interval={self.sync_interval} with npd.buffer.max_staleness={self.buffer.max_staleness} "
                f"can starve the trainer: between syncs the freshest samples are up to {self.sync_interval - 1} "
                "versions old. Use sync_interval <= max_staleness + 1."
            )
        if self.filter.mode == "student_lag":
            raise ValueError(
                "npd.filter.mode=student_lag needs IFDs of the current student, which the trainer does not "
                "compute while generating; use teacher_minus_behaviour or log_ratio here (student_lag is "
                "available offline: python -m verl_npd.score --behaviour PATH --mode student_lag)"
            )

    @classmethod
    def from_mapping(cls, values: Mapping | None) -> NPDConfig:
        return from_mapping(cls, values, "npd")


NPD_DEFAULTS_CONFIG = "npd_defaults"


def store_npd_defaults() -> None:
    """Put the ``npd:`` section with :class:`NPDConfig`'s defaults in Hydra's config store as
    ``npd_defaults``, which ``npd_trainer.yaml`` lists in its defaults: the dataclass is the one
    source of every NPD default. A plain mapping, not a structured config, so that a wrong key or
    value reaches :meth:`NPDConfig.from_mapping` (the preflight), which names it with its full key."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=NPD_DEFAULTS_CONFIG, node={"npd": asdict(NPDConfig())})
