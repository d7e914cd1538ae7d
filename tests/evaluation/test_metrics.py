"""Per-example metrics against values worked out by hand and their reference implementations."""

import random
import re

import pytest
import torch

from clbench.evaluation.metrics import (
    METRICS,
    edit_similarity,
    exact_match,
    first_char,
    get_metric,
    rouge_l,
    sari,
    score_predictions,
)


def test_exact_match_is_strict():
    assert exact_match("Paris", "Paris") == 1.0
    assert exact_match("paris", "Paris") == 0.0
    assert exact_match("Paris ", "Paris") == 0.0
    assert exact_match("", "Paris") == 0.0


def test_first_char():
    assert first_char("  B. because ...", "B") == 1.0
    assert first_char("C", "B") == 0.0
    assert first_char("", "B") == 0.0
    assert first_char("   ", "B") == 0.0
    assert first_char("", "") == 0.0


def test_rouge_l_by_hand():
    # tokens: [the cat sat on the mat] vs [the cat is on the mat]; LCS = the cat on the mat = 5
    # P = R = 5/6, F = 5/6. Case and punctuation are dropped by the rouge_score tokenizer.
    assert rouge_l("The cat, sat on the mat.", "the cat is on the mat") == pytest.approx(5 / 6)
    # [a b c] vs [a c d e]: LCS = a c = 2, P = 2/3, R = 2/4, F = 2*(1/3)/(2/3+1/2) = 4/7
    assert rouge_l("a b c", "a c d e") == pytest.approx(4 / 7)
    assert rouge_l("a b c", "a b c") == 1.0
    assert rouge_l("", "a b c") == 0.0
    assert rouge_l("!!!", "a") == 0.0


def _rouge_score_rouge_l(prediction: str, reference: str) -> float:
    """Google's rouge_score ROUGE-L F (no stemmer) written out: its tokenizer, an LCS table, Python
    floats (the package itself is not a dependency)."""

    def tokens(text: str) -> list[str]:
        return re.sub(r"[^a-z0-9]+", " ", text.lower()).split()

    pred, ref = tokens(prediction), tokens(reference)
    table = [[0] * (len(pred) + 1) for _ in range(len(ref) + 1)]
    for i, r in enumerate(ref, 1):
        for j, p in enumerate(pred, 1):
            table[i][j] = table[i - 1][j - 1] + 1 if r == p else max(table[i - 1][j], table[i][j - 1])
    lcs = table[-1][-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def test_rouge_l_is_rouge_scores_value_bit_for_bit_on_random_text():
    """torchmetrics' ROUGE-L gives rouge_score's double exactly on 500 random pairs with punctuation
    and case (in float32 it would not: 8/13 became 0.61538464), and leaves the default dtype alone."""
    rng = random.Random(0)
    words = ["cat", "Dog", "sun!", "map", "red-tea", "pen", "Box", "owl", "42", "a.b", "--"]
    for _ in range(500):
        pred, ref = (" ".join(rng.choice(words) for _ in range(rng.randint(0, 8))) for _ in range(2))
        assert rouge_l(pred, ref) == _rouge_score_rouge_l(pred, ref), (pred, ref)
    p, r = 4 / 6, 4 / 7  # LCS "cat sat on mat"
    assert rouge_l("the cat sat on a mat", "a cat sat on the mat today") == 2 * p * r / (p + r)
    assert torch.get_default_dtype() == torch.float32


def test_edit_similarity_by_hand():
    # kitten vs sitting: LCS "ittn" = 4, Indel distance = 6 + 7 - 2*4 = 5, similarity = 1 - 5/13 = 8/13.
    # TRACE (fuzzywuzzy) would report round(61.5) = 62; we keep the unrounded 0.615...
    assert edit_similarity("kitten", "sitting") == pytest.approx(8 / 13)
    assert edit_similarity("abc", "abc") == 1.0
    assert edit_similarity("", "") == 0.0
    assert edit_similarity("", "abc") == 0.0


# SARI by hand, one reference. source S = "a b c d", prediction C = "a b e", reference R = "a e d".
#   (x & y: n-grams in both; x - y: in x not in y; 0/0 counts as 1)
# 1-grams  S={a,b,c,d} C={a,b,e} R={a,e,d}
#   keep   S&C={a,b}, of which in R: {a}  -> P = 1/2; S&R={a,d}, kept of those: {a} -> R = 1/2; F = 1/2
#   delete S-C={c,d}, of which not in R: {c} -> P = 1/2
#   add    C-S={e}, in R: {e} -> P = 1; R-S={e} -> R = 1; F = 1
# 2-grams  S={ab,bc,cd} C={ab,be} R={ae,ed}
#   keep   S&C={ab}, none in R -> P = 0; S&R={} -> R = 1 (0/0); F = 0
#   delete S-C={bc,cd}, both not in R -> P = 1
#   add    C-S={be}, not in R -> P = 0; R-S={ae,ed} -> R = 0; F = 0
# 3-grams  S={abc,bcd} C={abe} R={aed}
#   keep   S&C={} -> P = 1, S&R={} -> R = 1, F = 1;  delete S-C={abc,bcd} -> P = 1;  add {abe} -> F = 0
# 4-grams  S={abcd} C={} R={}
#   keep F = 1 (0/0);  delete S-C={abcd} -> P = 1;  add: C-S={}, R-S={} -> F = 1
# keep = (1/2 + 0 + 1 + 1)/4 = 0.625, delete = (1/2 + 1 + 1 + 1)/4 = 0.875, add = (1 + 0 + 0 + 1)/4 = 0.5
# SARI = (0.625 + 0.875 + 0.5) / 3 = 2/3
SARI_SRC, SARI_PRED, SARI_REF = "a b c d", "a b e", "a e d"


def test_sari_by_hand():
    assert sari(SARI_SRC, SARI_PRED, [SARI_REF]) == pytest.approx(2 / 3)


def test_sari_argument_roles_matter():
    expected = 2 / 3
    assert sari(SARI_PRED, SARI_SRC, [SARI_REF]) != pytest.approx(expected)  # source <-> prediction
    assert sari(SARI_SRC, SARI_REF, [SARI_PRED]) != pytest.approx(expected)  # prediction <-> reference
    assert METRICS["sari"](SARI_PRED, SARI_REF, SARI_SRC) == pytest.approx(expected)


def test_sari_normalises_case_and_punctuation():
    # Lowercasing and 13a tokenisation make these the same as the plain example plus a final "." token.
    plain = sari("a b c d .", "a b e .", ["a e d ."])
    assert sari("A b c d.", "a B e.", ["a e D."]) == pytest.approx(plain)


def test_sari_matches_published_example():
    # The example in the Hugging Face `evaluate` SARI docs (the implementation TRACE calls): 26.9536... / 100
    src = "About 95 species are currently accepted ."
    pred = "About 95 you now get in ."
    refs = [
        "About 95 species are currently known .",
        "About 95 species are now accepted .",
        "95 species are now accepted .",
    ]
    assert sari(src, pred, refs) == pytest.approx(0.26953601953601954)


def test_sari_bounds_and_empty_prediction():
    assert sari("a b c", "a b c", ["a b c"]) == 1.0
    # The reference implementation gives an empty output deletion credit; the registry entry scores it 0.
    assert 0.0 < sari("a b c", "", ["a b"]) < 1.0
    assert METRICS["sari"]("", "a b", "a b c") == 0.0
    assert METRICS["sari"]("  ", "a b", "a b c") == 0.0
    with pytest.raises(ValueError):
        sari("a", "a", [])


def test_registry_names_and_uniform_signature():
    assert set(METRICS) == {"exact_match", "accuracy", "first_char", "rouge_l", "edit_similarity", "sari"}
    assert get_metric("accuracy") is get_metric("exact_match")
    for name, fn in METRICS.items():
        score = fn("a b", "a b", "a b c")
        assert score == 1.0, name
        assert fn("", "a b", "a b c") == 0.0, name


def test_unknown_metric_lists_known_names():
    with pytest.raises(
        ValueError, match="unknown metric 'bleu'; known: accuracy, edit_similarity, exact_match"
    ):
        get_metric("bleu")


def test_score_predictions():
    scores = score_predictions("first_char", ["A", "", "C)", " B"], ["A", "A", "B", "B"], ["q"] * 4)
    assert scores == [1.0, 0.0, 0.0, 1.0]
    assert sum(scores) / len(scores) == 0.5  # the empty prediction stays in the denominator
    assert score_predictions("sari", [SARI_PRED], [SARI_REF], [SARI_SRC]) == [pytest.approx(2 / 3)]
    with pytest.raises(ValueError, match="length mismatch"):
        score_predictions("exact_match", ["a"], ["a", "b"], ["", ""])
