"""Buffered samples on disk, in formats we own and that load without pickle: the tensors of all
samples in one safetensors file, everything else in one JSON file next to it."""

from __future__ import annotations

import json
import os

from safetensors.torch import load_file, save_file

from verl_npd.rollout.async_manager import GeneratedSample, PromptItem
from verl_npd.rollout.buffer import Sample

_TENSOR_FIELDS = ("teacher_topk_ids", "teacher_topk_log_probs")
# Tensors only some samples have (None otherwise): the span of a teacher with its own tokenizer.
_OPTIONAL_TENSOR_FIELDS = ("teacher_span",)
_LIST_FIELDS = ("response_ids", "rollout_log_probs", "teacher_cond", "teacher_uncond", "behaviour_uncond")


def save_samples(path: str, samples: list[Sample]) -> None:
    """Write ``path.json`` and ``path.safetensors`` atomically (temp files, then rename)."""
    tensors, records = {}, []
    for i, sample in enumerate(samples):
        g: GeneratedSample = sample.payload
        for name in _TENSOR_FIELDS:
            tensors[f"{i}.{name}"] = getattr(g, name).contiguous()
        for name in _OPTIONAL_TENSOR_FIELDS:
            if getattr(g, name) is not None:
                tensors[f"{i}.{name}"] = getattr(g, name).contiguous()
        records.append(
            {
                "uid": sample.uid,
                "version": sample.version,
                "prompt": {
                    "position": g.prompt.position,
                    "prompt_ids": g.prompt.prompt_ids,
                    "routing_key": g.prompt.routing_key,
                    "extra": g.prompt.extra,
                },
                "generated_version": g.version,
                "spans_sync": g.spans_sync,
                **{name: getattr(g, name) for name in _LIST_FIELDS},
            }
        )
    save_file(tensors, f"{path}.safetensors.tmp")
    with open(f"{path}.json.tmp", "w") as f:
        json.dump(records, f)
    os.replace(f"{path}.safetensors.tmp", f"{path}.safetensors")
    os.replace(f"{path}.json.tmp", f"{path}.json")


def load_samples(path: str) -> list[Sample]:
    with open(f"{path}.json") as f:
        records = json.load(f)
    tensors = load_file(f"{path}.safetensors") if records else {}
    samples = []
    for i, r in enumerate(records):
        generated = GeneratedSample(
            prompt=PromptItem(**r["prompt"]),
            version=r["generated_version"],
            spans_sync=r["spans_sync"],
            **{name: r[name] for name in _LIST_FIELDS},
            **{name: tensors[f"{i}.{name}"] for name in _TENSOR_FIELDS},
            **{name: tensors.get(f"{i}.{name}") for name in _OPTIONAL_TENSOR_FIELDS},
        )
        samples.append(Sample(uid=r["uid"], version=r["version"], payload=generated))
    return samples
