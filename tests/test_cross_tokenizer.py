"""Distillation across tokenizers (``npd.cross_tokenizer``): the alignment of two tokenizations of one
text on hand-written cases (merges, splits, byte fallbacks, special tokens), the loss against a
float64 brute force, and the same-tokenizer equivalence (the cross-tokenizer path with the student's
own tokenizer gives the plain path's loss, through the trainer's collate and verl's loss call).

The served teacher and the end-to-end run are in ``test_cross_tokenizer_served.py``."""

import math
import random

import pytest
import torch
from test_losses import ref_softmax, ref_token_loss

from verl_npd.losses import cross_tokenizer as cross_loss
from verl_npd.losses.distill import NPDLossConfig, per_token_distillation_loss
from verl_npd.rollout import cross_tokenizer as cross
from verl_npd.rollout.cross_tokenizer import CrossTokenizer, align_spans, token_char_spans

MODES = [("forward_kl_topk", "renorm", 0.5), ("forward_kl_topk", "bucket", 0.5), ("reverse_kl_topk", "renorm", 0.5),
         ("reverse_kl_topk", "bucket", 0.5), ("jsd", "renorm", 0.3), ("jsd", "bucket", 0.7), ("ce", "renorm", 0.5)]  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Tokenizers written out by hand
# ----------------------------------------------------------------------------------------------
def byte_level_tokenizer(merges: list[tuple[str, str]], specials=("<eot>",)):
    """GPT-2-style byte-level BPE over every byte, with ``merges`` (in byte-level symbols)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = sorted(ByteLevel.alphabet())
    vocab = {symbol: i for i, symbol in enumerate(alphabet)}
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(list(specials))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=specials[0])


def sentencepiece_tokenizer(merges: list[tuple[str, str]]):
    """Llama-2-style: "▁" for spaces, "a", "b" and ``merges`` as pieces, every other character as
    <0xNN> byte tokens (byte fallback)."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "</s>": 1} | {f"<0x{b:02X}>": 2 + b for b in range(256)}
    for piece in ["▁", "a", "b"] + [a + b for a, b in merges]:
        vocab.setdefault(piece, len(vocab))
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tokenizer.normalizer = normalizers.Replace(" ", "▁")
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tokenizer.add_special_tokens(["</s>"])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="</s>", unk_token="<unk>")


def tokens(tokenizer, text: str) -> list[str]:
    return tokenizer.convert_ids_to_tokens(tokenizer.encode(text, add_special_tokens=False))


def groups_as_strings(student, teacher, text: str):
    s_ids, t_ids = student.encode(text, add_special_tokens=False), teacher.encode(text, add_special_tokens=False)
    s_text, s_spans = token_char_spans(student, s_ids)
    t_text, t_spans = token_char_spans(teacher, t_ids)
    assert s_text == t_text == text
    names_s, names_t = student.convert_ids_to_tokens(s_ids), teacher.convert_ids_to_tokens(t_ids)
    return [([names_s[i] for i in g_s], [names_t[i] for i in g_t]) for g_s, g_t in align_spans(s_spans, t_spans)]


# ----------------------------------------------------------------------------------------------
# Alignment
# ----------------------------------------------------------------------------------------------
def test_align_spans_hand_written():
    # Boundaries that agree give one-token groups; a merge on either side a span.
    assert align_spans([(0, 1), (1, 2), (2, 4)], [(0, 2), (2, 3), (3, 4)]) == [
        (range(0, 2), range(0, 1)),
        (range(2, 3), range(1, 3)),
    ]
    # Crossing boundaries ("ab|c" against "a|bc") make one span of both.
    assert align_spans([(0, 2), (2, 3)], [(0, 1), (1, 3)]) == [(range(0, 2), range(0, 2))]
    # An empty span (part of a character) joins the group of the character it is part of, on
    # either side, even where the other side has a boundary there; never paired one to one.
    assert align_spans([(0, 1), (1, 1), (1, 2)], [(0, 1), (1, 2)]) == [
        (range(0, 1), range(0, 1)),
        (range(1, 3), range(1, 2)),
    ]
    assert align_spans([(0, 1), (1, 1), (1, 2)], [(0, 1), (1, 1), (1, 2)]) == [
        (range(0, 1), range(0, 1)),
        (range(1, 3), range(1, 3)),
    ]
    # Tokens that write nothing at the very end join the last group.
    assert align_spans([(0, 1), (1, 1)], [(0, 1)]) == [(range(0, 2), range(0, 1))]
    assert align_spans([], []) == []
    with pytest.raises(cross.CrossTokenizerError, match="different lengths"):
        align_spans([(0, 1)], [(0, 2)])


@pytest.fixture(scope="module")
def toy_tokenizers(toy_world, tmp_path_factory):
    """The toy student's tokenizer, and the second toy teacher's (built here: no model needed)."""
    from transformers import AutoTokenizer

    from verl_npd.toy.cross import build_cross_tokenizer

    path = str(tmp_path_factory.mktemp("cross-tokenizer"))
    build_cross_tokenizer(path)
    return AutoTokenizer.from_pretrained(toy_world.student_dir), AutoTokenizer.from_pretrained(path)


def test_merges_and_splits_of_the_toy_tokenizers(toy_tokenizers):
    student, teacher = toy_tokenizers
    assert groups_as_strings(student, teacher, "47+8=133. Answer: 9") == [
        (["4", "7"], ["47"]),  # the student splits what the teacher writes as one token
        (["+"], ["+"]),
        (["8"], ["8"]),
        (["="], ["="]),
        (["1", "3"], ["13"]),  # "133" is "13" "3" for the teacher: a span, then agreeing boundaries
        (["3"], ["3"]),
        (["."], ["."]),
        (["Ġ"], ["Ġ"]),
        (["Answer", ":", "Ġ"], ["Answer: "]),  # the teacher merges a word, its colon and space
        (["9"], ["9"]),
    ]


def test_byte_level_pieces_of_a_character():
    # "é" is two bytes: one merged token for the teacher, two byte tokens for the student.
    student = byte_level_tokenizer([])
    teacher = byte_level_tokenizer([("Ã", "©")])
    assert tokens(student, "aé!") == ["a", "Ã", "©", "!"] and tokens(teacher, "aé!") == ["a", "Ã©", "!"]
    text, spans = token_char_spans(student, student.encode("aé!"))
    assert text == "aé!" and spans == [(0, 1), (1, 1), (1, 2), (2, 3)]
    assert groups_as_strings(student, teacher, "aé!") == [(["a"], ["a"]), (["Ã", "©"], ["Ã©"]), (["!"], ["!"])]


def test_sentencepiece_byte_fallback_against_byte_level():
    # A Llama-2-style tokenizer writes "é" as <0xC3> <0xA9> and keeps its spaces in "▁" pieces.
    student = sentencepiece_tokenizer([("▁", "a")])
    teacher = byte_level_tokenizer([("a", "b"), ("Ġ", "a"), ("Ã", "©")])
    assert tokens(student, "b aé ab") == ["b", "▁a", "<0xC3>", "<0xA9>", "▁a", "b"]
    assert tokens(teacher, "b aé ab") == ["b", "Ġa", "Ã©", "Ġ", "ab"]
    text, spans = token_char_spans(student, student.encode("b aé ab", add_special_tokens=False))
    assert text == "b aé ab" and spans == [(0, 1), (1, 3), (3, 3), (3, 4), (4, 6), (6, 7)]
    assert groups_as_strings(student, teacher, "b aé ab") == [
        (["b"], ["b"]),
        (["▁a"], ["Ġa"]),
        (["<0xC3>", "<0xA9>"], ["Ã©"]),
        (["▁a", "b"], ["Ġ", "ab"]),  # boundaries that cross: " a|b" against " |ab"
    ]
    # Token strings are read inside a text: "▁a" is " a", as the byte-level "Ġa" is; byte pieces
    # and byte-fallback tokens are no whole character and match nothing.
    vocabulary = cross.VocabularyMap(student, teacher, student.eos_token_id, teacher.eos_token_id)
    ids = teacher.convert_tokens_to_ids(["Ġa", "b", "Ã©", "Ã", "<eot>"])
    assert student.convert_ids_to_tokens(vocabulary(torch.tensor(ids))[:2].tolist()) == ["▁a", "b"]
    assert vocabulary(torch.tensor(ids))[2:4].tolist() == [cross.UNMATCHED] * 2
    assert vocabulary(torch.tensor(ids))[4] == student.eos_token_id  # end of turn by role: <eot> -> </s>
    assert vocabulary(torch.tensor([len(teacher) + 5])).tolist() == [cross.UNMATCHED]  # beyond the tokenizer


def test_special_tokens_end_of_turn_and_a_special_written_mid_response(toy_tokenizers):
    student, teacher = toy_tokenizers
    view = CrossTokenizer(student, teacher)
    assert view.teacher.convert_ids_to_tokens(view.teacher_header_ids) == ["<s>", "<|assistant|>", "Ċ"]
    start, end = student.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    response = student.encode("12", add_special_tokens=False) + [start] + student.encode(" 3", add_special_tokens=False) + [end]
    sample = view.teacher_sample([{"role": "user", "content": "Compute 9+3."}], response)
    assert teacher.decode(sample.prompt_ids) == "<s><|user|>\nCompute 9+3.<|end|>\n<|assistant|>\n"
    # The student's special token mid-response is text to the teacher; its end of turn is the teacher's.
    assert teacher.convert_ids_to_tokens(sample.response_ids) == [
        "12", "<", "|", "i", "m", "_", "s", "t", "a", "r", "t", "|", ">", "Ġ", "3", "<|end|>"
    ]  # fmt: skip
    assert sample.groups == [
        (range(0, 2), range(0, 1)),
        (range(2, 3), range(1, 13)),
        (range(3, 4), range(13, 14)),
        (range(4, 5), range(14, 15)),
        (range(5, 6), range(15, 16)),
    ]
    assert view.vocabulary(torch.tensor([teacher.eos_token_id])).tolist() == [end]
    # Without its end-of-turn token (cut at the length limit) the teacher's response has none either.
    assert view.teacher_sample([{"role": "user", "content": "x"}], response[:-1]).response_ids == sample.response_ids[:-1]


def test_row_targets_hand_written():
    T = cross.Target
    # Student finer: "4" "7" inside the teacher's "47", the second after the "4" already written.
    assert cross.row_targets([(0, 1), (1, 2)], [(0, 2)], "47") == [T(range(0, 1), range(0, 1), ""), T(range(1, 2), range(0, 1), "4")]
    # Student coarser: "ab" spans the teacher's "a" "b" (ULD over both); then boundaries agree on "c".
    assert cross.row_targets([(0, 2), (2, 3)], [(0, 1), (1, 2), (2, 3)], "abc") == [
        T(range(0, 1), range(0, 2), None),
        T(range(1, 2), range(2, 3), ""),
    ]
    # Crossing: " a|b" against " |ab": " a" crosses (ULD over " " and "ab"), "b" lies inside "ab".
    assert cross.row_targets([(0, 2), (2, 3)], [(0, 1), (1, 3)], " ab") == [
        T(range(0, 1), range(0, 2), None),
        T(range(1, 2), range(1, 2), "a"),
    ]
    # A character in byte pieces on the student's side is one target of its pieces (ULD); on the
    # teacher's side the pieces' first row is where the character's distribution is.
    assert cross.row_targets([(0, 1), (1, 1), (1, 2)], [(0, 1), (1, 2)], "aé") == [
        T(range(0, 1), range(0, 1), ""),
        T(range(1, 3), range(1, 2), None),
    ]
    assert cross.row_targets([(0, 1), (1, 2)], [(0, 1), (1, 1), (1, 2)], "aé") == [
        T(range(0, 1), range(0, 1), ""),
        T(range(1, 2), range(1, 3), None),
    ]


def test_projection_onto_the_students_rows(toy_tokenizers):
    """Each student row takes the teacher's top-k at the teacher token it lies in, each candidate on
    the student token it starts with after what is already written (conditioned on that); a student
    token that spans several teacher tokens takes GOLD's merged top-k for ULD."""
    from verl_npd.rollout.scoring import PromptScores

    student, teacher = toy_tokenizers
    view = CrossTokenizer(student, teacher)
    response = student.encode("Answer:47", add_special_tokens=False) + [student.eos_token_id]
    assert student.convert_ids_to_tokens(response) == ["Answer", ":", "4", "7", "<|im_end|>"]
    sample = view.teacher_sample([{"role": "user", "content": "Compute 40+7."}], response)
    # Without its space "Answer" is six letters to the teacher.
    assert teacher.convert_ids_to_tokens(sample.response_ids) == ["A", "n", "s", "w", "e", "r", ":", "47", "<|end|>"]
    n_teacher = len(sample.prompt_ids) + len(sample.response_ids)
    t0 = len(sample.prompt_ids) - 1  # the teacher's row scoring its response token 0
    gen = torch.Generator().manual_seed(0)
    top_lp = torch.log_softmax(torch.randn(n_teacher, 6, generator=gen), -1)[:, :4]
    top_ids = torch.randint(0, len(teacher), (n_teacher, 4), generator=gen)
    candidates = {t0 + 6: [":", "Answer: ", "<s>", "9"], t0 + 7: ["47", "43", "55", "4"], t0 + 8: ["<|end|>", "5", "55", "7"]}
    for row, names in candidates.items():
        top_ids[row] = torch.tensor(teacher.convert_tokens_to_ids(names))
    actual = torch.log(torch.rand(n_teacher - 1, generator=gen)).tolist()
    scores = PromptScores(topk_ids=top_ids.int(), topk_log_probs=top_lp, token_log_probs=actual)
    prompt_len = 7
    projected = view.project(sample, scores, prompt_len, len(response))
    s0 = prompt_len - 1
    assert projected.span.tolist() == [0] * s0 + [1, 1, 1, 1, 1] + [0]

    def row(s_row):
        return [student.convert_ids_to_tokens(i) if i >= 0 else i for i in projected.topk_ids[s_row].tolist()], projected.topk_log_probs[s_row].tolist()

    # "Answer" spans six teacher tokens: the top-k at "A" times "nswer" as written, for ULD.
    torch.testing.assert_close(projected.topk_log_probs[s0], top_lp[t0] + sum(actual[t0 + 1 : t0 + 6]))
    assert (projected.topk_ids[s0] == cross.UNMATCHED).all()
    # ":": boundaries agree; "Answer: " is written starting with the student's "Answer"; the
    # student cannot write "<s>" (its tokenizer has no "<"): ULD.
    lp = top_lp[t0 + 6].tolist()
    assert row(s0 + 1)[0] == [":", "Answer", "9", cross.UNMATCHED]
    assert row(s0 + 1)[1] == pytest.approx([lp[0], lp[1], lp[3], lp[2]])
    # "4" starts the teacher's "47": "47", "43" and "4" start with the student's "4", "55" with "5".
    lp = top_lp[t0 + 7].double().exp().tolist()
    assert row(s0 + 2)[0] == ["4", "5", cross.UNMATCHED, cross.UNMATCHED]
    assert row(s0 + 2)[1][:2] == pytest.approx([math.log(lp[0] + lp[1] + lp[3]), math.log(lp[2])], rel=1e-6)
    # "7" after the "4" written: "47" and "43" continue it, renormalised; "4" and "55" do not.
    assert row(s0 + 3)[0] == ["7", "3", cross.UNMATCHED, cross.UNMATCHED]
    given = lp[0] + lp[1]
    assert row(s0 + 3)[1][:2] == pytest.approx([math.log(lp[0] / given), math.log(lp[1] / given)], rel=1e-6)
    # The end of turn: the teacher's maps to the student's by role; "5" and "55" on the student's "5".
    lp = top_lp[t0 + 8].double().exp().tolist()
    assert row(s0 + 4)[0] == ["<|im_end|>", "5", "7", cross.UNMATCHED]
    assert row(s0 + 4)[1][:3] == pytest.approx([math.log(lp[0]), math.log(lp[1] + lp[2]), math.log(lp[3])], rel=1e-6)
    # Rows without a target: the prompt's.
    for r in range(s0):
        assert (projected.topk_ids[r] == cross.UNMATCHED).all() and torch.isinf(projected.topk_log_probs[r]).all()


# ----------------------------------------------------------------------------------------------
# The loss against a float64 brute force
# ----------------------------------------------------------------------------------------------
VOCAB, TOPK = 10, 4


def ref_cross_loss(mode, tail, beta, uld_weight, logits, ids, lps, span, targets) -> list[float]:
    """Per row, from the definitions in docs/algorithm.md: the configured loss on the matched
    entries alone, plus uld_weight times the L1 distance of the sorted unmatched probabilities."""
    out = []
    for t in range(len(logits)):
        m = span[t]
        if m == 0:
            out.append(0.0)
            continue
        kept = [(v, lp) for v, lp in zip(ids[t], lps[t]) if v != -1 and lp > -1e4]
        loss = 0.0
        if kept:
            loss = ref_token_loss(mode, tail, beta, logits[t], [v for v, _ in kept], [lp for _, lp in kept], targets[t])
        unmatched = sorted((math.exp(lp) for v, lp in zip(ids[t], lps[t]) if v == -1 and lp > -1e4), reverse=True)
        if unmatched:
            rest = sum(math.log(ref_softmax(logits[t + j])[targets[t + j]]) for j in range(1, m))
            p_s = ref_softmax(logits[t])
            student = sorted((p * math.exp(rest) for v, p in enumerate(p_s) if v not in {v for v, _ in kept}), reverse=True)
            student += [0.0] * len(unmatched)
            loss += uld_weight * sum(abs(a - b) for a, b in zip(student, unmatched))
        out.append(loss)
    return out


def cross_case(seed: int):
    """Rows of one sequence: 1:1 rows with some unmatched entries, a span of 3 rows, a 1:n span
    (one student row, all entries unmatched), a row with nothing matched, a prompt row."""
    rng = random.Random(seed)
    span = [0, 1, 3, 0, 0, 1, 1, 2, 0, 1]
    logits = [[rng.gauss(0, 2) for _ in range(VOCAB)] for _ in span]
    ids, lps = [], []
    for t, m in enumerate(span):
        teacher = ref_softmax([rng.gauss(0, 2) for _ in range(VOCAB + 3)])  # a larger vocabulary
        top = sorted(range(VOCAB + 3), key=lambda v: -teacher[v])[:TOPK]
        lp = [math.log(teacher[v]) for v in top]
        if m == 0:
            ids.append([-1] * TOPK), lps.append([float("-inf")] * TOPK)
        elif m > 1 or t == 6:  # spans, and a row where no entry has a student id
            ids.append([-1] * TOPK), lps.append([x + rng.uniform(-2, 0) * (m > 1) for x in lp])
        else:  # teacher ids >= VOCAB have no student id
            ids.append([v if v < VOCAB else -1 for v in top]), lps.append(lp)
    targets = [rng.randrange(VOCAB) for _ in span]
    return logits, ids, lps, span, targets


def run_cross(mode, tail, beta, uld_weight, case, dtype=torch.float64):
    logits, ids, lps, span, targets = case
    settings = NPDLossConfig(tail_mode=tail, beta=beta)
    logits_t = torch.tensor(logits, dtype=dtype, requires_grad=True)
    output = cross_loss.cross_tokenizer_loss(
        logits_t, torch.tensor(ids), torch.tensor(lps, dtype=dtype), torch.tensor(span), torch.tensor(targets),
        mode, settings, uld_weight, chunk_size=3,
    )  # fmt: skip
    return logits_t, output


@pytest.mark.parametrize("mode,tail,beta", MODES)
def test_cross_tokenizer_loss_matches_brute_force(mode, tail, beta):
    for seed in range(3):
        case = cross_case(seed)
        _, output = run_cross(mode, tail, beta, 0.7, case)
        expected = torch.tensor(ref_cross_loss(mode, tail, beta, 0.7, *case), dtype=torch.float64)
        torch.testing.assert_close(output.loss.detach(), expected, rtol=1e-10, atol=1e-10)
        assert (output.uld[torch.tensor(case[3]) == 0] == 0).all() and output.uld.sum() > 0


def test_cross_tokenizer_loss_gradient_matches_finite_differences():
    case = cross_case(7)
    logits_t, output = run_cross("forward_kl_topk", "renorm", 0.5, 1.3, case)
    output.loss.sum().backward()
    logits = case[0]
    step = 1e-6
    for t, v in [(1, 0), (2, 3), (3, 5), (4, 1), (6, 2), (7, 9), (8, 4)]:  # span rows reach back
        def total(delta, t=t, v=v):
            changed = [row[:] for row in logits]
            changed[t][v] += delta
            return sum(ref_cross_loss("forward_kl_topk", "renorm", 0.5, 1.3, changed, *case[1:]))

        numeric = (total(step) - total(-step)) / (2 * step)
        assert logits_t.grad[t, v].item() == pytest.approx(numeric, rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("mode,tail,beta", MODES)
def test_entry_mask_is_the_loss_of_the_kept_entries(mode, tail, beta):
    from test_losses import make_case, reference_losses

    student, ids, lp, _, targets = make_case(3, shape=(4, 6), dtype=torch.float64)
    mask = torch.rand(ids.shape, generator=torch.Generator().manual_seed(4)) < 0.6
    mask[0, 0] = False  # a row with nothing kept
    settings = NPDLossConfig(tail_mode=tail, beta=beta)
    got = per_token_distillation_loss(student, ids, lp, mode, settings, targets, entry_mask=mask, chunk_size=5).loss
    for index in range(got.numel()):
        row = torch.unravel_index(torch.tensor(index), got.shape)
        keep = mask[row]
        if not keep.any():
            assert got[row] == 0
            continue
        expected = reference_losses(mode, tail, beta, student[row][None], ids[row][keep][None], lp[row][keep][None], targets[row][None])
        assert got[row].item() == pytest.approx(expected.item(), rel=1e-10, abs=1e-12)


def test_span_continuation_and_sorted_distance_closed_forms():
    lp = torch.tensor([[-1.0, -2.0, -3.0, -4.0, -5.0]])
    assert cross_loss.span_continuation_log_probs(lp, torch.tensor([[3, 0, 0, 2, 1]])).tolist() == [[-5.0, 0, 0, -5.0, 0]]
    student = torch.log(torch.tensor([[0.1, 0.6, 0.3]]))
    teacher = torch.log(torch.tensor([[0.5, 0.2, 0.05]]))
    # sorted: (0.6, 0.3, 0.1) against (0.5, 0.2, 0.05); two ranks used.
    distance = cross_loss.sorted_probability_distance(student, teacher, torch.tensor([2]))
    assert distance.item() == pytest.approx(0.1 + 0.1)


# ----------------------------------------------------------------------------------------------
# One tokenizer through the cross-tokenizer path: the plain path's loss
# ----------------------------------------------------------------------------------------------
def forward_scores(model, sequence: list[int], k: int):
    """A prefill's scores in verl's layout (row t scores token t + 1, a zero pad row last), by a
    plain forward pass."""
    from verl_npd.rollout.scoring import PromptScores

    with torch.no_grad():
        log_probs = torch.log_softmax(model(torch.tensor([sequence])).logits[0].double(), -1)
    top_lp, top_ids = log_probs[:-1].topk(k)
    actual = log_probs[:-1].gather(-1, torch.tensor(sequence[1:])[:, None]).squeeze(-1)
    return PromptScores(
        topk_ids=torch.cat([top_ids.int(), torch.zeros(1, k, dtype=torch.int32)]),
        topk_log_probs=torch.cat([top_lp.float(), torch.zeros(1, k)]),
        token_log_probs=actual.tolist(),
    )


@pytest.mark.parametrize("loss_name,tail", [("npd_forward_kl_topk", "renorm"), ("npd_reverse_kl_topk", "bucket"), ("npd_ce", "renorm")])
def test_one_tokenizer_through_the_cross_path_gives_the_plain_loss(toy_world, monkeypatch, loss_name, tail):
    """The toy teacher shares the student's tokenizer: scored through CrossTokenizer, collated as
    the trainer collates, converted as verl converts and run through verl's loss call, its samples
    give the same per-token loss as the plain path, and ULD is 0."""
    import json

    from test_losses import TOPK as k, _configs
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.padding import left_right_2_no_padding

    import verl.trainer.distillation.losses as verl_losses
    from verl_npd.losses import verl_registration
    from verl_npd.rollout.async_manager import GeneratedSample, PromptItem
    from verl_npd.toy.world import read_problems
    from verl_npd.trainer.near_policy_trainer import collate_samples, nest_like_input_ids

    verl_registration.register()
    monkeypatch.setenv(verl_registration.ENV_VAR, json.dumps({"tail_mode": tail}))
    student = AutoTokenizer.from_pretrained(toy_world.student_dir)
    teacher_model = AutoModelForCausalLM.from_pretrained(toy_world.teacher_dir, dtype=torch.float32).eval()
    view = CrossTokenizer(student, AutoTokenizer.from_pretrained(toy_world.teacher_dir))
    prompts, _ = read_problems(toy_world.val_parquet)
    responses = ["47+8=55. Answer: 55", "1+1=3. 3", "9-9=0. Answer: 0"]
    plain, crossed = [], []
    for prompt, text in zip(prompts, responses):
        messages = [{"role": "user", "content": prompt}]
        prompt_ids = view.student.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        response_ids = student.encode(text, add_special_tokens=False) + [student.eos_token_id]
        scores = forward_scores(teacher_model, prompt_ids + response_ids, k)
        sample = view.teacher_sample(messages, response_ids)
        assert sample.prompt_ids + sample.response_ids == prompt_ids + response_ids
        projected = view.project(sample, scores, len(prompt_ids), len(response_ids))
        common = dict(prompt=PromptItem(0, prompt_ids, None, {}), response_ids=response_ids,
                      rollout_log_probs=[-1.0] * len(response_ids), version=0, teacher_cond=[], teacher_uncond=[],
                      behaviour_uncond=[])  # fmt: skip
        plain.append(GeneratedSample(teacher_topk_ids=scores.topk_ids, teacher_topk_log_probs=scores.topk_log_probs, **common))
        crossed.append(GeneratedSample(teacher_topk_ids=projected.topk_ids, teacher_topk_log_probs=projected.topk_log_probs,
                                       teacher_span=projected.span, **common))  # fmt: skip
        response_rows = slice(len(prompt_ids) - 1, len(prompt_ids) + len(response_ids) - 1)
        assert projected.span[response_rows].tolist() == [1] * len(response_ids)
        torch.testing.assert_close(projected.topk_ids[response_rows], scores.topk_ids[response_rows], rtol=0, atol=0)

    actor, distill = _configs(loss_name)
    losses = {}
    for name, samples in (("plain", plain), ("cross", crossed)):
        td = left_right_2_no_padding(collate_samples(samples, student.pad_token_id).to_tensordict())
        if name == "cross":
            nest_like_input_ids(td, cross_loss.SPAN_KEY)
            tu.assign_non_tensor(td, **{cross_loss.ULD_WEIGHT_KEY: 1.0})
        tu.assign_non_tensor(td, dp_size=1, batch_num_tokens=int(td["response_mask"].sum()), global_batch_size=len(samples))
        total = int(td["input_ids"].offsets()[-1])
        logits = torch.randn(total, len(student), generator=torch.Generator().manual_seed(5))
        outputs = verl_losses.distillation_ppo_loss(actor, distill, data=td, student_logits=logits.unsqueeze(0))
        if name == "cross":
            assert (outputs[verl_registration.ULD_KEY] == 0).all()
        offsets = td["input_ids"].offsets()
        model_output = {key: torch.nested.nested_tensor_from_jagged(v.squeeze(0), offsets) for key, v in outputs.items()}
        losses[name], _ = verl_losses.get_distillation_loss_fn(loss_name)(actor, distill, model_output, td)
    torch.testing.assert_close(losses["cross"], losses["plain"], rtol=0, atol=0)
    assert losses["plain"].abs().sum() > 0


def test_the_unmatched_constant_is_shared():
    # rollout/ does not import losses/: each states it, and they must agree.
    assert cross.UNMATCHED == cross_loss.UNMATCHED


def test_checkpointed_samples_keep_their_span(tmp_path):
    """A resumed run trains buffered samples as they were scored: across tokenizers, with their span."""
    from verl_npd.rollout.async_manager import GeneratedSample, PromptItem
    from verl_npd.rollout.buffer import Sample
    from verl_npd.rollout.sample_io import load_samples, save_samples

    def sample(span):
        return GeneratedSample(
            prompt=PromptItem(3, [1, 2], None, {"data_source": "x"}, messages=[{"role": "user", "content": "q"}]),
            response_ids=[5, 6], rollout_log_probs=[-0.5, -0.25], version=2, teacher_cond=[-1.0, -2.0, -3.0],
            teacher_uncond=[-1.5, -2.5, -3.5], behaviour_uncond=[-0.75, -0.5],
            teacher_topk_ids=torch.tensor([[1, -1], [2, 3], [0, 0]], dtype=torch.int32),
            teacher_topk_log_probs=torch.tensor([[-0.1, -2.0], [-0.2, -3.0], [0.0, 0.0]]), teacher_span=span,
        )  # fmt: skip

    save_samples(str(tmp_path / "buffer"), [Sample("a", 2, sample(torch.tensor([0, 1, 0], dtype=torch.int32))),
                                            Sample("b", 2, sample(None))])  # fmt: skip
    crossed, plain = (s.payload for s in load_samples(str(tmp_path / "buffer")))
    assert crossed.teacher_span.tolist() == [0, 1, 0] and plain.teacher_span is None
    assert crossed.teacher_topk_ids.tolist() == [[1, -1], [2, 3], [0, 0]] and crossed.teacher_cond == [-1.0, -2.0, -3.0]
    assert crossed.prompt.messages is None  # needed only until scoring
