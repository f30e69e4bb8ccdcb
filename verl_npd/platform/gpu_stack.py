"""What verl's GPU path needs installed beside verl, and what NPD does when part of it is missing.

verl 0.9.1's ``vllm`` extra (vLLM 0.24.0 on CUDA torch 2.11.0) lacks two packages its FSDP2 + vLLM
path imports, both in verl's ``fsdp`` extra (verl-0.9.1.dist-info/METADATA):

* flash-attn (``flash-attn==2.8.3``): verl builds the student with
  ``attn_implementation=flash_attention_2`` unless ``actor_rollout_ref.model.override_config``
  names another (verl/workers/config/model.py:185), and transformers raises ImportError when the
  actor is built without it. PyPI has flash-attn 2.8.3 only as a source archive whose setup.py
  imports torch, so pip cannot build it in an isolated build environment: the README installs it
  in a second command, and without it NPD builds the student with ``sdpa``
  (:func:`use_sdpa_without_flash_attn`);
* cupy (``cupy-cuda13x==14.0.1``, the ``gpu`` extra installs it): verl's ``nccl`` checkpoint engine,
  the weight sync of a standalone rollout, imports it first thing
  (verl/checkpoint_engine/nccl_checkpoint_engine.py:22-23) and is left unregistered without it
  (verl/checkpoint_engine/__init__.py:37-43).

verl also pins the vLLM its server code was written against (``vllm==0.24.0``); another version is
reported by the preflight.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util

from omegaconf import DictConfig, OmegaConf, open_dict

ATTENTION_KEY = "actor_rollout_ref.model.override_config.attn_implementation"
FLASH_ATTENTION = "flash_attention_2"


def module_installed(name: str) -> bool:
    """Whether ``import name`` would find the module (nothing is imported)."""
    return importlib.util.find_spec(name) is not None


def installed_version(distribution: str) -> str | None:
    """The installed version of ``distribution``, None when it is not installed."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def verl_pinned_version(package: str) -> str | None:
    """The version verl's extras pin ``package`` to (``vllm==0.24.0`` in verl 0.9.1's ``vllm`` extra),
    read from verl's installed metadata; None when verl pins no exact version of it."""
    from packaging.requirements import Requirement

    for line in importlib.metadata.requires("verl") or []:
        requirement = Requirement(line)
        specifiers = list(requirement.specifier)
        if requirement.name == package and len(specifiers) == 1 and specifiers[0].operator == "==":
            return specifiers[0].version
    return None


def use_sdpa_without_flash_attn(config: DictConfig) -> str | None:
    """Without flash-attn, and with no attention named in the config, build the student with
    ``sdpa`` (exact on NPD's packed micro-batches, slower than flash-attn on GPUs) instead of
    letting verl's ``flash_attention_2`` default fail when the actor is built. Returns the one
    warning to show, or None when nothing changed."""
    if OmegaConf.select(config, ATTENTION_KEY) is not None or module_installed("flash_attn"):
        return None
    with open_dict(config):
        OmegaConf.update(config, ATTENTION_KEY, "sdpa", force_add=True)
    return (
        f"flash-attn is not installed: the student is built with {ATTENTION_KEY}=sdpa instead of verl's "
        f"{FLASH_ATTENTION} (install flash-attn as README.md 'GPUs' says, or set that key to silence this)"
    )


def uses_vllm(config: DictConfig) -> bool:
    """Whether this job starts vLLM servers: the student's rollout, or teacher replicas (a teacher
    served at ``npd.teacher.url`` runs elsewhere)."""
    if config.actor_rollout_ref.rollout.name == "vllm":
        return True
    served = OmegaConf.select(config, "npd.teacher.url") is not None
    return config.distillation.enabled and not served and any(
        teacher.inference.name == "vllm" for teacher in config.distillation.teacher_models.values()
    )


def gpu_stack_problems(config: DictConfig) -> list[str]:
    """What the installed packages lack for this config on GPUs, one line each naming the setting
    that needs it and the fix (the CPU path needs none of them: the toy runs npd_cpu, npd_gloo and sdpa)."""
    problems = []
    if OmegaConf.select(config, ATTENTION_KEY) == FLASH_ATTENTION and not module_installed("flash_attn"):
        problems.append(
            f"{ATTENTION_KEY}={FLASH_ATTENTION} but flash-attn is not installed: install it as README.md 'GPUs' "
            "says, or set it to sdpa"
        )
    if config.trainer.device == "cpu":
        return problems
    rollout = config.actor_rollout_ref.rollout
    if rollout.nnodes > 0 and rollout.checkpoint_engine.backend == "nccl" and not module_installed("cupy"):
        problems.append(
            "actor_rollout_ref.rollout.checkpoint_engine.backend=nccl needs cupy, which is not installed "
            "(verl/checkpoint_engine/nccl_checkpoint_engine.py:22-23 imports it): pip install -e '.[gpu]'"
        )
    if uses_vllm(config):
        pinned, installed = verl_pinned_version("vllm"), installed_version("vllm")
        if installed is None:
            problems.append("the rollout or the teacher runs on vLLM, which is not installed: pip install -e '.[gpu]'")
        elif pinned is not None and installed != pinned:
            problems.append(
                f"vLLM {installed} is installed, but verl {importlib.metadata.version('verl')} pins vllm=={pinned} "
                f"(its server code is written against it): pip install -e '.[gpu]'"
            )
    return problems
