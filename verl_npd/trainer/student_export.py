"""The distilled student as a Hugging Face model directory: ``<npd.output_dir>/student``.

verl writes the HF model (config, safetensors weights, tokenizer, chat template) into a
checkpoint's ``actor/huggingface/`` when ``actor.checkpoint.save_contents`` holds ``hf_model``;
verl-npd always asks for it (:func:`ask_for_hf_weights`) and copies that directory to ``student/``
at the end of a run (:func:`publish_student`).
"""

from __future__ import annotations

import glob
import json
import os
import shutil

HF_MODEL_CONTENT = "hf_model"
STUDENT_DIR_NAME = "student"
# Beside the weights: the score function the run validated with (verl's reward.custom_reward_function),
# which ``python -m verl_npd.eval --model <student>`` uses when no --reward-path is given.
REWARD_FUNCTION_FILE = "reward_function.json"


def ask_for_hf_weights(config) -> None:
    """Add ``hf_model`` to the actor's checkpoint contents, so that every checkpoint (and the
    end-of-run export) carries the student as a Hugging Face model."""
    checkpoint = config.actor_rollout_ref.actor.checkpoint
    contents = list(checkpoint.save_contents)
    if HF_MODEL_CONTENT not in contents:
        checkpoint.save_contents = [*contents, HF_MODEL_CONTENT]


def has_hf_weights(hf_dir: str) -> bool:
    return bool(glob.glob(os.path.join(hf_dir, "*.safetensors")))


def publish_student(hf_dir: str, output_dir: str, reward_function: dict | None = None) -> str:
    """Copy verl's ``huggingface/`` directory to ``<output_dir>/student`` (replacing an earlier
    one only once the new one is complete) and return its path. ``reward_function`` (``path`` and
    ``name``, as in verl's ``reward.custom_reward_function``) is written beside the weights.

    verl 0.9.1 builds the model it saves with ``torch_dtype=bfloat16`` (fsdp_checkpoint_manager.py:446)
    but writes the trainer's tensors as they are (fp32 here), so its ``config.json`` names a dtype
    the weights do not have, and transformers 5 loads in the config's dtype by default: the loaded
    model would not be the trained one. The copy's config names the weights' own dtype.
    """
    if not has_hf_weights(hf_dir):
        raise FileNotFoundError(f"{hf_dir} holds no .safetensors weights: the checkpoint was saved without hf_model")
    target = os.path.join(os.path.abspath(output_dir), STUDENT_DIR_NAME)
    staging = target + ".tmp"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(hf_dir, staging)
    config_path = os.path.join(staging, "config.json")
    with open(config_path) as f:
        config = json.load(f)
    dtype = _weights_dtype(sorted(glob.glob(os.path.join(staging, "*.safetensors"))))
    # transformers 5 writes "dtype"; a config written by transformers 4 names it "torch_dtype".
    config["dtype"] = dtype
    if "torch_dtype" in config:
        config["torch_dtype"] = dtype
    with open(config_path, "w") as f:
        json.dump(config, f, indent=2)
    if reward_function is not None:
        with open(os.path.join(staging, REWARD_FUNCTION_FILE), "w") as f:
            json.dump(reward_function, f, indent=2)
    if os.path.exists(target):
        shutil.rmtree(target)
    os.replace(staging, target)
    return target


def run_reward_function(config) -> dict | None:
    """verl's ``reward.custom_reward_function`` of a run's config as ``{"path", "name"}``; None when
    the run validates with verl's own scorers."""
    custom = config.get("reward", {}).get("custom_reward_function", {})
    if not custom.get("path"):
        return None
    return {"path": custom["path"], "name": custom.get("name") or "compute_score"}


def _weights_dtype(paths: list[str]) -> str:
    """The floating-point dtype of the tensors in safetensors files (the shards of one model), as
    transformers names it."""
    from safetensors import safe_open

    dtypes = set()
    for path in paths:
        with safe_open(path, framework="pt") as f:
            dtypes |= {str(f.get_slice(name).get_dtype()) for name in f.keys()}
    names = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
    floating = {names[d] for d in dtypes if d in names}
    if len(floating) != 1:
        where = os.path.dirname(paths[0])
        raise ValueError(f"{where}: expected one floating-point dtype in its weights, found {sorted(dtypes)}")
    return floating.pop()
