"""Unbiased pass@k from n samples of which c are correct (Chen et al. 2021, "Evaluating Large Language Models
Trained on Code", eq. 1).

Why not ``1 - (1 - c/n)**k``: that estimate is biased when k approaches n. The unbiased one is
``1 - C(n-c, k) / C(n, k)``; written as the product ``prod_{i=n-c+1}^{n} (1 - k/i)`` it never forms the huge
binomials, so it stays exact to float precision for n in the thousands.
"""

from __future__ import annotations

from collections.abc import Iterable


def pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
    """Probability that at least one of k samples drawn without replacement from the n is correct."""
    for name, value in (("num_samples", num_samples), ("num_correct", num_correct), ("k", k)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not 0 <= num_correct <= num_samples:
        raise ValueError(f"need 0 <= num_correct <= num_samples, got num_correct={num_correct}, "
                         f"num_samples={num_samples}")
    if not 1 <= k <= num_samples:
        raise ValueError(f"need 1 <= k <= num_samples, got k={k}, num_samples={num_samples}")
    if num_samples - num_correct < k:  # every k-subset contains a correct sample
        return 1.0
    all_wrong = 1.0
    for i in range(num_samples - num_correct + 1, num_samples + 1):
        all_wrong *= 1.0 - k / i
    return 1.0 - all_wrong


def mean_pass_at_k(counts: Iterable[tuple[int, int]], k: int) -> float:
    """Mean pass@k over problems given as (num_samples, num_correct) pairs."""
    values = [pass_at_k(n, c, k) for n, c in counts]
    if not values:
        raise ValueError("mean_pass_at_k needs at least one problem")
    return sum(values) / len(values)
