"""Per-example text metrics, all on a [0, 1] scale, deterministic and offline.

Every metric in ``METRICS`` has the signature ``fn(prediction, reference, source) -> float`` so the
evaluation loop can treat them alike; ``source`` (the prompt) is used only by SARI. An empty prediction
scores 0 under every metric and still counts in the mean, as in TRACE's scripts. (SARI alone would give
an empty output deletion credit; the registry entry scores it 0 instead, while ``sari()`` itself stays
identical to the reference implementation.)
"""

from __future__ import annotations

import re
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from rapidfuzz import fuzz

Metric = Callable[[str, str, str], float]


def exact_match(prediction: str, reference: str) -> float:
    """1.0 iff the strings are identical; task post-processing has already been applied upstream."""
    return float(prediction == reference)


def first_char(prediction: str, reference: str) -> float:
    """ScienceQA-style accuracy on the first non-space character, i.e. the answer letter."""
    pred, ref = prediction.lstrip()[:1], reference.lstrip()[:1]
    return float(bool(pred) and pred == ref)


_DEFAULT_DTYPE = threading.Lock()


@contextmanager
def _float64_tensors() -> Iterator[None]:
    """torchmetrics makes each ROUGE score a `torch.tensor` of a Python float, in the default dtype:
    in float64 it is the exact double rouge_score returns; in float32, 8/13 became 0.61538464.
    The default dtype is process-wide: the lock keeps two scoring threads from restoring each
    other's; clbench scores in one thread and creates no tensors in others meanwhile."""
    with _DEFAULT_DTYPE:
        before = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)
        try:
            yield
        finally:
            torch.set_default_dtype(before)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 (beta = 1) without stemming, by torchmetrics.text: rouge_score's tokenizer
    (lowercase, non-[a-z0-9] runs split) and value, bit for bit (tests/evaluation/test_metrics.py)."""
    from torchmetrics.functional.text.rouge import rouge_score  # 1 s to import: only where scored

    with _float64_tensors():
        return rouge_score(prediction, reference, rouge_keys="rougeL")["rougeL_fmeasure"].item()


def edit_similarity(prediction: str, reference: str) -> float:
    """TRACE's Py150 metric, ``fuzz.ratio / 100`` (normalised Indel similarity).

    Unlike TRACE (fuzzywuzzy rounds the ratio to an int) we keep the exact value. As in TRACE, an empty
    prediction or reference scores 0 (rapidfuzz alone would give two empty strings 1.0).
    """
    if not prediction or not reference:
        return 0.0
    return fuzz.ratio(prediction, reference) / 100.0


# --- SARI ---------------------------------------------------------------------------------------------
# torchmetrics 1.9.0 has no SARI, so this is the Hugging Face ``evaluate`` "sari" metric that TRACE calls
# (the tensor2tensor variant of Xu et al. 2016: 0/0 := 1 and the fixed keep recall), divided by 100.

_13A_RULES = (
    (re.compile(r"([\{-\~\[-\` -\&\(-\+\:-\@\/])"), r" \1 "),  # symbols
    (re.compile(r"([^0-9])([\.,])"), r"\1 \2 "),  # period/comma unless preceded by a digit
    (re.compile(r"([\.,])([^0-9])"), r" \1 \2"),  # period/comma unless followed by a digit
    (re.compile(r"([0-9])(-)"), r"\1 \2 "),  # dash after a digit
)


def _sari_tokens(text: str) -> list[str]:
    """``evaluate``'s SARI normalisation: lowercase, sacrebleu's 13a tokenizer, split on single spaces."""
    line = text.lower().replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    for entity, char in (("&quot;", '"'), ("&amp;", "&"), ("&lt;", "<"), ("&gt;", ">")):
        line = line.replace(entity, char)
    line = f" {line} "
    for pattern, repl in _13A_RULES:
        line = pattern.sub(repl, line)
    # The reference splits the joined string on " ", so an empty sentence is one empty token.
    return " ".join(line.split()).split(" ")


def _ngrams(tokens: Sequence[str], n: int) -> list[str]:
    return [" ".join(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def _f1(precision: float, recall: float) -> float:
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def _sari_ngram(src: list[str], pred: list[str], refs: list[list[str]]) -> tuple[float, float, float]:
    """Keep F1, deletion precision and addition F1 for one n-gram order."""
    num_refs = len(refs)
    ref_c = Counter(g for r in refs for g in r)
    src_c = Counter({g: c * num_refs for g, c in Counter(src).items()})
    pred_c = Counter({g: c * num_refs for g, c in Counter(pred).items()})

    keep, keep_all = src_c & pred_c, src_c & ref_c
    keep_good = keep & ref_c
    keep_p = sum(keep_good[g] / keep[g] for g in keep_good) / len(keep) if keep else 1.0
    keep_r = sum(keep_good.values()) / sum(keep_all.values()) if keep_all else 1.0

    delete = src_c - pred_c
    del_good = delete - ref_c
    del_p = sum(del_good[g] / delete[g] for g in del_good) / len(delete) if delete else 1.0

    add, add_all = set(pred_c) - set(src_c), set(ref_c) - set(src_c)
    add_good = len(add & set(ref_c))
    add_p = add_good / len(add) if add else 1.0
    add_r = add_good / len(add_all) if add_all else 1.0
    return _f1(keep_p, keep_r), del_p, _f1(add_p, add_r)


def sari(source: str, prediction: str, references: Sequence[str]) -> float:
    """SARI (Xu et al. 2016): mean of keep F1, deletion precision and addition F1 over 1..4-grams."""
    if not references:
        raise ValueError("SARI needs at least one reference")
    src, pred = _sari_tokens(source), _sari_tokens(prediction)
    refs = [_sari_tokens(r) for r in references]
    per_n = [
        _sari_ngram(_ngrams(src, n), _ngrams(pred, n), [_ngrams(r, n) for r in refs]) for n in range(1, 5)
    ]
    keep, delete, add = (sum(scores) / 4 for scores in zip(*per_n))
    return (keep + delete + add) / 3


# --- registry -----------------------------------------------------------------------------------------

METRICS: dict[str, Metric] = {
    "exact_match": lambda p, r, s: exact_match(p, r),
    "first_char": lambda p, r, s: first_char(p, r),
    "rouge_l": lambda p, r, s: rouge_l(p, r),
    "edit_similarity": lambda p, r, s: edit_similarity(p, r),
    "sari": lambda p, r, s: sari(s, p, [r]) if p.strip() else 0.0,
}
METRICS["accuracy"] = METRICS["exact_match"]


def get_metric(name: str) -> Metric:
    """Look a metric up by name, failing with the list of known names so config typos are obvious."""
    try:
        return METRICS[name]
    except KeyError:
        raise ValueError(f"unknown metric {name!r}; known: {', '.join(sorted(METRICS))}") from None


def score_predictions(
    metric_name: str, predictions: Sequence[str], references: Sequence[str], sources: Sequence[str]
) -> list[float]:
    """Per-example scores; the caller averages them (empty predictions score 0 and stay counted)."""
    if not len(predictions) == len(references) == len(sources):
        raise ValueError(
            f"length mismatch: {len(predictions)} predictions, {len(references)} references, "
            f"{len(sources)} sources"
        )
    metric = get_metric(metric_name)
    return [metric(p, r, s) for p, r, s in zip(predictions, references, sources)]
