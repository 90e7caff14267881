"""Unbiased pass@k against exact combinatorics."""

from fractions import Fraction
from math import comb

import pytest

from flash_rc.rewards.pass_at_k import mean_pass_at_k, pass_at_k


def exact_pass_at_k(n: int, c: int, k: int) -> Fraction:
    return 1 - Fraction(comb(n - c, k), comb(n, k))


@pytest.mark.parametrize("n, c, k", [(n, c, k) for n in (1, 2, 5, 16) for c in range(n + 1) for k in range(1, n + 1)])
def test_matches_exact_binomial_formula(n, c, k):
    assert pass_at_k(n, c, k) == pytest.approx(float(exact_pass_at_k(n, c, k)), abs=1e-12)


def test_hand_worked_values():
    # n=10, c=3, k=2: 1 - C(7,2)/C(10,2) = 1 - 21/45 = 8/15
    assert pass_at_k(10, 3, 2) == pytest.approx(8 / 15)
    # k=1 is the plain success rate c/n
    assert pass_at_k(16, 4, 1) == pytest.approx(0.25)
    assert pass_at_k(5, 0, 5) == 0.0
    assert pass_at_k(5, 1, 5) == 1.0  # any 5 of 5 include the correct one


def test_stable_for_large_n():
    # C(2000, 1000) overflows a float; the product form does not. Exact value from Fractions:
    assert pass_at_k(2000, 7, 1000) == pytest.approx(float(exact_pass_at_k(2000, 7, 1000)), rel=1e-12)
    assert pass_at_k(10_000, 1, 100) == pytest.approx(0.01, rel=1e-9)


def test_mean_over_problems():
    assert mean_pass_at_k([(10, 3), (10, 0)], k=2) == pytest.approx((8 / 15 + 0) / 2)
    with pytest.raises(ValueError, match="at least one"):
        mean_pass_at_k([], k=1)


@pytest.mark.parametrize("n, c, k, error", [
    (5, 6, 1, ValueError), (5, -1, 1, ValueError), (5, 2, 0, ValueError), (5, 2, 6, ValueError),
    (5.0, 2, 1, TypeError), (5, True, 1, TypeError),
])
def test_rejects_bad_counts(n, c, k, error):
    with pytest.raises(error):
        pass_at_k(n, c, k)
