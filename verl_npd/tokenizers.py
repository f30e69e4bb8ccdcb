"""Can a teacher be fed the student's token ids? One rule for the trainer's preflight and the
scoring CLI.

NPD (like verl's distillation) tokenizes every sample once, with the student's tokenizer, and hands
the same ids to the teacher; the teacher's log-probs of those ids are only meaningful when both
tokenizers map every token to the same id. That map (``get_vocab()``, added tokens included) is
the whole rule: which token plays eos or pad is each model's own business (the student's stops its
generations; padding is masked out), so those roles are not compared.
"""

from __future__ import annotations


class TokenizerError(ValueError):
    """A tokenizer that cannot be loaded, or a teacher and student that cannot share token ids."""


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:  # transformers raises OSError/ValueError/... depending on what is missing
        lines = str(e).strip().splitlines()
        raise TokenizerError(
            f"cannot load the tokenizer from {str(path)!r}: {type(e).__name__}: {lines[0] if lines else ''}"
        ) from None


def check_shared_token_ids(teacher, student, teacher_name: str = "teacher", student_name: str = "student") -> None:
    """Raise :class:`TokenizerError` naming the difference unless both map tokens to the same ids."""
    vocab_t, vocab_s = teacher.get_vocab(), student.get_vocab()
    if vocab_t == vocab_s:
        return
    differing = sorted(t for t in vocab_t.keys() | vocab_s.keys() if vocab_t.get(t) != vocab_s.get(t))
    problem = (
        f"{teacher_name} and {student_name} tokenizers differ: vocab sizes {teacher_name} {len(vocab_t)} vs "
        f"{student_name} {len(vocab_s)}, {len(differing)} tokens with different ids"
    )
    specials_t, specials_s = _special_tokens(teacher), _special_tokens(student)
    if specials_t != specials_s:
        only_t = {t: i for t, i in specials_t.items() if specials_s.get(t) != i}
        only_s = {t: i for t, i in specials_s.items() if specials_t.get(t) != i}
        detail = f"differing special tokens: {teacher_name} {only_t} vs {student_name} {only_s}"
    else:
        detail = f"e.g. {differing[:3]}"
    raise TokenizerError(f"{problem} ({detail}); the teacher is fed the student's token ids, so both need one vocabulary")


def _special_tokens(tokenizer) -> dict[str, int]:
    return {token.content: i for i, token in sorted(tokenizer.added_tokens_decoder.items()) if token.special}
