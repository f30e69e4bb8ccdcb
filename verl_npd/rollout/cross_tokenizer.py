"""Scoring across tokenizers (``npd.cross_tokenizer.enabled``): the teacher reads the student's
sample in its own tokens, and what it says is mapped back onto the student's tokens by character
offsets (docs/algorithm.md, "Across tokenizers").

Per sample, on the driver, before and after the teacher's prefill:

1. **Text.** The student's response (without its end-of-turn token) is decoded token by token
   (:func:`token_char_spans`): the text, and the characters each token wrote. A token that writes
   only part of a character (a byte-fallback or byte-level piece of a multi-byte character) gets an
   empty span at that character's start; the token that completes the character gets the character.
2. **The teacher's tokens.** The prompt's messages are rendered with the teacher's chat template,
   the response text is encoded with the teacher's tokenizer (and decoded back the same way, which
   must give the same text), and the teacher's end-of-turn token follows when the student's
   response ended with its own.
3. **Alignment**: both token sequences are walked by character. :func:`align_spans` groups them
   where both tokenizers have a token boundary at the same character (a group of one token on each
   side: the boundaries agree; any other group, a merge, a split or both, is a span);
   :func:`row_targets` gives each student token its target: the teacher token it lies in (with the
   characters of that token already written before it), or, for a student token that crosses
   teacher tokens or a character written in byte pieces, the teacher tokens it spans.
4. **Projection** (:meth:`CrossTokenizer.project`) of the teacher's prefill onto the student's rows,
   in verl's layout (row t scores token t + 1):

   * inside one teacher token: its top-k, each candidate conditioned on the characters already
     written and put on the student token its remaining text starts with (the student token of the
     same string where there is one: the teacher's "47" on the student's "4" at the first digit, on
     "7" after the "4"); candidates on one student token add up; a candidate the student cannot
     write stays ``UNMATCHED`` (-1); ``teacher_span`` 1;
   * across teacher tokens: the teacher's top-k at the first of them, each log-prob plus the
     log-probs of the teacher's later tokens as written (GOLD's "observed" merge), every id
     ``UNMATCHED``; ``teacher_span`` the number of student rows it covers (byte pieces and the
     token completing the character), the later ones 0.

The loss (:mod:`verl_npd.losses.cross_tokenizer`) reads ids, log-probs and ``teacher_span``: the
configured loss on the entries with a student id, ULD on the ``UNMATCHED`` ones. With the same
tokenizer on both sides every group is a single token, every id maps to itself, and the projection
is the teacher's plain top-k: the loss is the same-tokenizer loss (tested).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from verl_npd.filters.ifd import TokenizerInfo, render_chat_ids

# A teacher top-k entry whose string no student token has (its id column), and a row's entries
# that carry no target (prompt rows, the later rows of a span).
UNMATCHED = -1
_REPLACEMENT = "\ufffd"  # what a decoder writes for bytes that are not (yet) a whole character


class CrossTokenizerError(ValueError):
    """A sample or a tokenizer pair that the cross-tokenizer path cannot align."""


def _decode(tokenizer, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


def token_char_spans(tokenizer, ids: Sequence[int]) -> tuple[str, list[tuple[int, int]]]:
    """The text ``ids`` decode to, and each token's [start, end) characters in it.

    Decoded incrementally, as vLLM's detokenizer does: each window starts at the previous token
    that wrote characters, so that a decoder that treats the first token of a text specially (the
    leading space of SentencePiece's "▁") sees the same context as in the whole text. A token whose
    window ends in an incomplete character (U+FFFD) writes nothing yet: it gets an empty span at the
    current end, and the token that completes the character gets the character.
    """
    spans: list[tuple[int, int]] = []
    pieces: list[str] = []
    end = 0
    anchor = done = 0  # decode from ``anchor``; tokens before ``done`` have their spans
    for i in range(len(ids)):
        window = _decode(tokenizer, ids[anchor : i + 1])
        if window.endswith(_REPLACEMENT) and i + 1 < len(ids):
            continue
        head = _decode(tokenizer, ids[anchor:done])
        if not window.startswith(head):
            raise CrossTokenizerError(
                f"decoding token {ids[i]} changes the text before it ({head!r} -> {window!r}); the "
                "tokenizer's decoder is not incremental"
            )
        new = window[len(head) :]
        spans += [(end, end)] * (i - done) + [(end, end + len(new))]
        pieces.append(new)
        end += len(new)
        anchor, done = done, i + 1
    return "".join(pieces), spans


def align_spans(
    student: Sequence[tuple[int, int]], teacher: Sequence[tuple[int, int]]
) -> list[tuple[range, range]]:
    """Groups of consecutive student and teacher tokens that cover the same characters, in order:
    (student token indices, teacher token indices). Both sequences must spell the same text.

    Walks both, advancing the side whose current token ends first; a group closes where both end
    at the same character. A token with an empty span (part of a character; a token that writes
    nothing) never closes a group: it joins the group of the characters that follow it, or the
    last group at the end of the text. Where two byte-level tokenizers split one character into
    pieces, the pieces are never paired one to one, since their bytes may be split differently.
    """
    if (student[-1][1] if student else 0) != (teacher[-1][1] if teacher else 0):
        raise CrossTokenizerError("the student's and the teacher's tokens spell texts of different lengths")
    groups: list[tuple[range, range]] = []
    s = t = s_start = t_start = 0
    while s < len(student) and t < len(teacher):
        if student[s][0] == student[s][1]:
            s += 1
            continue
        if teacher[t][0] == teacher[t][1]:
            t += 1
            continue
        s_end, t_end = student[s][1], teacher[t][1]
        if s_end <= t_end:
            s += 1
        if t_end <= s_end:
            t += 1
        if s_end == t_end:
            groups.append((range(s_start, s), range(t_start, t)))
            s_start, t_start = s, t
    if s_start < len(student) or t_start < len(teacher):  # tokens that write nothing, at the end
        if groups:
            last_s, last_t = groups.pop()
            s_start, t_start = last_s.start, last_t.start
        groups.append((range(s_start, len(student)), range(t_start, len(teacher))))
    return groups


def end_of_turn_id(tokenizer, **chat_template_kwargs) -> int:
    """The special token the chat template closes an assistant turn with (ChatML's ``<|im_end|>``,
    Llama 3's ``<|eot_id|>``): the first special token after the turn's content."""
    sentinel = "NPD-SENTINEL-ASSISTANT-TURN"
    messages = [{"role": "user", "content": "NPD-SENTINEL-USER-TURN"}, {"role": "assistant", "content": sentinel}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False, **chat_template_kwargs)
    if sentinel not in text:
        raise CrossTokenizerError("the chat template does not write the assistant's message")
    after = tokenizer.encode(text.split(sentinel, 1)[1], add_special_tokens=False)
    specials = {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
    for i in after:
        if i in specials:
            return i
    raise CrossTokenizerError("the chat template closes an assistant turn with no special token")


class VocabularyMap:
    """Teacher id -> student id of the same decoded string (``UNMATCHED`` where there is none), and
    the teacher's end-of-turn token -> the student's, whatever their strings.

    A token's string is what it adds to a text (decoded after an anchor token, so that a
    SentencePiece "▁the" is " the", as it is inside a text). Tokens that decode to no whole
    character (byte pieces) match nothing. Where several student tokens share a string (a
    byte-fallback token and a plain one), the one the student's tokenizer encodes the string to
    is taken, else the lowest id.
    """

    def __init__(self, student, teacher, student_end_of_turn: int, teacher_end_of_turn: int):
        by_string: dict[str, list[int]] = {}
        for i, string in enumerate(token_strings(student)):
            if string is not None:
                by_string.setdefault(string, []).append(i)
        self.student_of: dict[str, int] = {}
        for string, ids in by_string.items():
            if len(ids) > 1:
                encoded = student.encode(string, add_special_tokens=False)
                ids = [encoded[0]] if len(encoded) == 1 and encoded[0] in ids else ids
            self.student_of[string] = min(ids)
        self.teacher_strings = token_strings(teacher)
        table = [
            UNMATCHED if string is None else self.student_of.get(string, UNMATCHED) for string in self.teacher_strings
        ]
        table[teacher_end_of_turn] = student_end_of_turn
        self.table = torch.tensor(table, dtype=torch.int64)
        self.student = student
        self._first_tokens: dict[str, int] = {}

    def __call__(self, teacher_ids: torch.Tensor) -> torch.Tensor:
        """Student ids (int32) for ``teacher_ids``; ids beyond the teacher's tokenizer (a padded
        embedding matrix) are ``UNMATCHED``."""
        ids = teacher_ids.long()
        inside = (ids >= 0) & (ids < len(self.table))
        mapped = self.table[ids.clamp(0, len(self.table) - 1)]
        return torch.where(inside, mapped, UNMATCHED).to(torch.int32)

    def teacher_string(self, teacher_id: int) -> str | None:
        return self.teacher_strings[teacher_id] if 0 <= teacher_id < len(self.teacher_strings) else None

    def first_student_token(self, text: str) -> int:
        """The student's token of ``text``, or else the first token the student's tokenizer writes
        ``text`` with; ``UNMATCHED`` where that is its unknown token."""
        if text in self.student_of:
            return self.student_of[text]
        if text not in self._first_tokens:
            ids = self.student.encode(text, add_special_tokens=False)
            unknown = self.student.unk_token_id
            self._first_tokens[text] = ids[0] if ids and ids[0] != unknown else UNMATCHED
        return self._first_tokens[text]


def token_strings(tokenizer) -> list[str | None]:
    """Each id's string (module docstring of :class:`VocabularyMap`), None where it is no whole
    character."""
    anchor = _anchor_id(tokenizer)
    head = _decode(tokenizer, [anchor])
    strings: list[str | None] = []
    for i in range(len(tokenizer)):
        text = _decode(tokenizer, [anchor, i])
        string = text[len(head) :] if text.startswith(head) else None
        strings.append(None if not string or _REPLACEMENT in string else string)
    return strings


def _anchor_id(tokenizer) -> int:
    """A token that decodes to one visible character the same way alone and twice in a row: the
    context before each token whose string is read."""
    specials = set(tokenizer.all_special_ids)
    for i in range(len(tokenizer)):
        if i in specials:
            continue
        alone = _decode(tokenizer, [i])
        if len(alone) == 1 and alone.isprintable() and not alone.isspace() and _decode(tokenizer, [i, i]) == alone * 2:
            return i
    raise CrossTokenizerError("the tokenizer has no single-character token to read token strings after")


@dataclass(frozen=True)
class Target:
    """What the row of one student token (with the byte pieces before it) is trained towards."""

    student: range  # student response tokens: one, or byte pieces and the token completing the character
    teacher: range  # teacher response tokens: the one the student token lies in, or those it spans
    # Inside one teacher token: the teacher token's characters written before the student token
    # ("" where both start together). None: the student token crosses teacher tokens (ULD).
    written: str | None


def row_targets(student: Sequence[tuple[int, int]], teacher: Sequence[tuple[int, int]], text: str) -> list[Target]:
    """Each student token's target (module docstring, 4.), from both tokenizations' character spans
    of ``text``. A student token lying inside one teacher token (both starting together, or the
    student finer) takes that token's row; any other (crossing a teacher boundary, or a character
    written in byte pieces) takes the teacher tokens from the one its first character starts in to
    the one its last character is in."""
    targets: list[Target] = []
    i = j = 0
    while i < len(student):
        first = i
        while i < len(student) and student[i][0] == student[i][1]:  # pieces of a character
            i += 1
        if i == len(student):  # tokens that write nothing, at the end: no target
            break
        start, end = student[first][0], student[i][1]
        i += 1
        # The teacher token the character at ``start`` begins in (its first piece, if in pieces).
        while j < len(teacher) and teacher[j][1] <= start and not teacher[j][0] == teacher[j][1] == start:
            j += 1
        t_start, t_end = teacher[j]
        if i - first == 1 and t_start <= start and end <= t_end and t_start < t_end:
            targets.append(Target(range(first, i), range(j, j + 1), text[t_start:start]))
            continue
        last = j
        while last + 1 < len(teacher) and teacher[last + 1][0] < end:
            last += 1
        targets.append(Target(range(first, i), range(j, last + 1), None))
    return targets


@dataclass(frozen=True)
class TeacherSample:
    """One student sample in the teacher's tokens, and how the two responses align."""

    prompt_ids: list[int]  # the teacher's chat template, same messages
    response_ids: list[int]  # the response text in the teacher's tokens (+ its end-of-turn token)
    groups: list[tuple[range, range]]  # (student response tokens, teacher response tokens)
    targets: list[Target]  # one per student token that has one

    @property
    def span_token_fraction(self) -> float:
        """The share of the student's response tokens in spans (groups other than one token each)."""
        total = sum(len(s) for s, _ in self.groups)
        in_spans = sum(len(s) for s, t in self.groups if not len(s) == len(t) == 1)
        return in_spans / total if total else 0.0


@dataclass(frozen=True)
class ProjectedScores:
    """The teacher's prefill on the student's rows (verl's layout; :class:`CrossTokenizer.project`)."""

    topk_ids: torch.Tensor  # [S, k] int32 student ids, UNMATCHED where none
    topk_log_probs: torch.Tensor  # [S, k] float32
    span: torch.Tensor  # [S] int32: student tokens the row's target covers (0: none)


class CrossTokenizer:
    """One teacher's view of the student's samples (module docstring).

    Args:
        student, teacher: the two Hugging Face tokenizers.
        chat_template_kwargs: verl's ``data.apply_chat_template_kwargs``, for both templates.
    """

    def __init__(self, student, teacher, **chat_template_kwargs):
        self.student = student
        self.teacher = teacher
        self.chat_template_kwargs = chat_template_kwargs
        self.teacher_header_ids = list(TokenizerInfo.from_tokenizer(teacher, **chat_template_kwargs).header_ids)
        self.student_end_of_turn = end_of_turn_id(student, **chat_template_kwargs)
        self.teacher_end_of_turn = end_of_turn_id(teacher, **chat_template_kwargs)
        # A response ends with the end-of-turn token, or with the tokenizer's eos where that differs.
        self.student_stops = {self.student_end_of_turn, student.eos_token_id} - {None}
        self.vocabulary = VocabularyMap(student, teacher, self.student_end_of_turn, self.teacher_end_of_turn)
        # The rollout manager calls it from worker threads, two waves at once: a Hugging Face fast
        # tokenizer may refuse to be used from two threads at a time ("Already borrowed").
        self._lock = threading.Lock()

    def teacher_sample(self, messages: list[dict], response_ids: Sequence[int]) -> TeacherSample:
        with self._lock:
            return self._teacher_sample(messages, response_ids)

    def _teacher_sample(self, messages: list[dict], response_ids: Sequence[int]) -> TeacherSample:
        stopped = bool(response_ids) and response_ids[-1] in self.student_stops
        content = list(response_ids[:-1] if stopped else response_ids)
        text, student_spans = token_char_spans(self.student, content)
        if text != _decode(self.student, content):
            raise CrossTokenizerError(f"the student's tokens decode to {_decode(self.student, content)!r} as a whole "
                                      f"but to {text!r} token by token")  # fmt: skip
        teacher_ids = self.teacher.encode(text, add_special_tokens=False)
        teacher_text, teacher_spans = token_char_spans(self.teacher, teacher_ids)
        if teacher_text != text:
            raise CrossTokenizerError(
                f"the teacher's tokenizer does not give back the student's text: {text!r} encodes and "
                f"decodes to {teacher_text!r}"
            )
        groups = align_spans(student_spans, teacher_spans)
        targets = row_targets(student_spans, teacher_spans, text)
        if stopped:  # the end-of-turn tokens, by their role
            n_s, n_t = len(content), len(teacher_ids)
            groups.append((range(n_s, n_s + 1), range(n_t, n_t + 1)))
            targets.append(Target(range(n_s, n_s + 1), range(n_t, n_t + 1), ""))
            teacher_ids = [*teacher_ids, self.teacher_end_of_turn]
        prompt_ids = render_chat_ids(self.teacher, messages, add_generation_prompt=True, **self.chat_template_kwargs)
        return TeacherSample(prompt_ids=prompt_ids, response_ids=teacher_ids, groups=groups, targets=targets)

    def project(
        self, sample: TeacherSample, scores, student_prompt_len: int, student_response_len: int
    ) -> ProjectedScores:
        """The teacher's prefill of ``sample.prompt_ids + sample.response_ids`` (``scores``:
        :class:`verl_npd.rollout.scoring.PromptScores`) on the rows of the student's sequence of
        ``student_prompt_len + student_response_len`` tokens."""
        with self._lock:
            return self._project(sample, scores, student_prompt_len, student_response_len)

    def _project(self, sample: TeacherSample, scores, student_prompt_len: int, student_response_len: int):
        k = scores.topk_ids.shape[-1]
        rows = student_prompt_len + student_response_len
        ids = torch.full((rows, k), UNMATCHED, dtype=torch.int32)
        log_probs = torch.full((rows, k), float("-inf"), dtype=torch.float32)
        span = torch.zeros(rows, dtype=torch.int32)
        s_row, t_row = student_prompt_len - 1, len(sample.prompt_ids) - 1  # the rows of response token 0
        for target in sample.targets:
            row, first = s_row + target.student.start, t_row + target.teacher.start
            if target.written is None:
                rest = sum(scores.token_log_probs[t_row + j] for j in target.teacher[1:])
                log_probs[row] = scores.topk_log_probs[first] + rest
                span[row] = len(target.student)
                continue
            entries = self._entries(scores.topk_ids[first], scores.topk_log_probs[first], target.written)
            if entries is None:
                continue
            ids[row, : len(entries[0])], log_probs[row, : len(entries[0])] = entries
            span[row] = 1
        return ProjectedScores(topk_ids=ids, topk_log_probs=log_probs, span=span)

    def _entries(self, teacher_ids: torch.Tensor, teacher_log_probs: torch.Tensor, written: str):
        """One row's (student ids, log-probs) from the teacher's top-k at the teacher token the
        student token lies in, given the characters of it already ``written``; None: no entry.

        Each teacher candidate goes to the student token of its string (the same string where the
        student has it, else the first token the student writes it with), after ``written`` and
        conditioned on it: candidates that do not continue ``written`` are dropped and the others
        renormalised. Candidates on one student token add up; candidates the student cannot write
        stay ``UNMATCHED`` (ULD)."""
        mapped = self.vocabulary(teacher_ids)
        if written == "" and bool((mapped != UNMATCHED).all()) and len(set(mapped.tolist())) == len(mapped):
            return mapped, teacher_log_probs  # boundaries agree and every string is a student token
        candidates = []
        for teacher_id, student_id, log_prob in zip(teacher_ids.tolist(), mapped.tolist(), teacher_log_probs.tolist()):
            string = self.vocabulary.teacher_string(teacher_id)
            if written == "":
                if student_id == UNMATCHED and string is not None:
                    student_id = self.vocabulary.first_student_token(string)
            elif string is not None and len(string) > len(written) and string.startswith(written):
                student_id = self.vocabulary.first_student_token(string[len(written) :])
            else:
                continue
            candidates.append((student_id, log_prob))
        if not candidates:
            return None
        given = torch.logsumexp(torch.tensor([lp for _, lp in candidates], dtype=torch.float64), 0) if written else 0.0
        merged: dict[int, float] = {}
        unmatched: list[float] = []
        for student_id, log_prob in candidates:
            log_prob = float(log_prob - given)
            if student_id == UNMATCHED:
                unmatched.append(log_prob)
            elif student_id in merged:
                merged[student_id] = float(torch.logaddexp(torch.tensor(merged[student_id]), torch.tensor(log_prob)))
            else:
                merged[student_id] = log_prob
        student_ids = [*merged, *[UNMATCHED] * len(unmatched)]
        values = [*merged.values(), *unmatched]
        return torch.tensor(student_ids, dtype=torch.int32), torch.tensor(values, dtype=torch.float32)
