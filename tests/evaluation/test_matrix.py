"""Summary numbers of the accuracy matrix against values worked out by hand."""

import math

import numpy as np
import pytest

from clbench.evaluation.matrix import (
    bwt_gem,
    bwt_trace,
    fwt,
    overall_performance,
    own_task_score,
    summarize,
)

# T = 3 tasks. Row t = after training through task t (row 0 = starting model); column i-1 = task i.
FULL = [
    [0.2, 0.1, 0.3],  # start:        R_{0,1}, R_{0,2}, R_{0,3}
    [0.8, 0.4, 0.35],  # after task 1: R_{1,1} (diag), R_{1,2} (for FWT), R_{1,3} (unused)
    [0.6, 0.9, 0.6],  # after task 2: R_{2,1} (unused), R_{2,2} (diag), R_{2,3} (for FWT)
    [0.5, 0.7, 0.9],  # after task 3: last row, R_{3,3} is also the diagonal
]
# OP        = (0.5 + 0.7 + 0.9) / 3                         = 2.1 / 3  = 0.7
# diagonal R_{i,i} = 0.8, 0.9, 0.9
# BWT_TRACE = ((0.5-0.8) + (0.7-0.9) + (0.9-0.9)) / 3       = -0.5 / 3 = -0.1666...
# BWT_GEM   = ((0.5-0.8) + (0.7-0.9)) / 2                   = -0.5 / 2 = -0.25
# FWT       = ((R_{1,2}-R_{0,2}) + (R_{2,3}-R_{0,3})) / 2 = ((0.4-0.1) + (0.6-0.3)) / 2 = 0.3
EXPECTED = {"OP": 0.7, "BWT_TRACE": -0.5 / 3, "BWT_GEM": -0.25, "FWT": 0.3}


def test_full_matrix_by_hand():
    assert summarize(FULL) == pytest.approx(EXPECTED)


def test_individual_functions_and_numpy_input():
    arr = np.array(FULL)
    assert overall_performance(arr) == pytest.approx(0.7)
    assert bwt_trace(arr) == pytest.approx(-0.5 / 3)
    assert bwt_gem(arr) == pytest.approx(-0.25)
    assert fwt(arr) == pytest.approx(0.3)
    assert own_task_score(arr) == pytest.approx((0.8 + 0.9 + 0.9) / 3)  # the diagonal, not row 0 or T


def test_cells_no_formula_reads_do_not_matter():
    changed = [row[:] for row in FULL]
    changed[1][2] = changed[2][0] = 0.0  # R_{1,3} and R_{2,1}
    assert summarize(changed) == pytest.approx(EXPECTED)


@pytest.mark.parametrize("missing", [None, math.nan])
def test_only_diagonal_and_last_row(missing):
    m = missing
    partial = [
        [m, m, m],
        [0.8, m, m],
        [m, 0.9, m],
        [0.5, 0.7, 0.9],
    ]
    out = summarize(partial)
    assert out["OP"] == pytest.approx(0.7)
    assert out["BWT_TRACE"] == pytest.approx(-0.5 / 3)
    assert out["BWT_GEM"] == pytest.approx(-0.25)
    assert out["FWT"] is None
    assert own_task_score(partial) == pytest.approx((0.8 + 0.9 + 0.9) / 3)
    partial[2][1] = m
    assert own_task_score(partial) is None  # a missing diagonal cell is not skipped


def test_fwt_needs_row_zero_even_with_superdiagonal():
    no_start = [row[:] for row in FULL]
    no_start[0] = [None, None, None]
    assert fwt(no_start) is None
    assert bwt_gem(no_start) == pytest.approx(-0.25)


def test_missing_last_row_entry_gives_none():
    partial = [row[:] for row in FULL]
    partial[3][1] = None
    out = summarize(partial)
    assert out["OP"] is None and out["BWT_TRACE"] is None and out["BWT_GEM"] is None
    assert out["FWT"] == pytest.approx(0.3)


def test_single_task():
    # T = 1: OP = R_{1,1}; TRACE BWT has only the zero i = T term; GEM BWT and FWT divide by T-1 = 0.
    assert summarize([[None], [0.6]]) == {
        "OP": pytest.approx(0.6),
        "BWT_TRACE": 0.0,
        "BWT_GEM": None,
        "FWT": None,
    }


@pytest.mark.parametrize("bad", [[[0.1, 0.2], [0.3, 0.4]], [[0.1]], [[]], [0.1, 0.2]])
def test_wrong_shape_is_rejected(bad):
    with pytest.raises(ValueError, match="T\\+1"):
        summarize(bad)
