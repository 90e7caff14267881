"""Per-token KL estimators (flash_rc/algo/kl.py)."""

import math

import pytest
import torch

from flash_rc.algo.kl import KL_TYPES, kl_penalty

# Token 0: Δ = log π_θ − log π_ref = 0.  Token 1: Δ = −1 − (−2) = +1.  Token 2: Δ = −2 − (−1) = −1.
LOG_PROB = [0.0, -1.0, -2.0]
REF_LOG_PROB = [0.0, -2.0, -1.0]
# k3 = e^r − r − 1 with r = −Δ: token 1: e^−1 + 1 − 1 = 0.3679; token 2: e − 1 − 1 = 0.7183.
EXPECTED = {
    "kl": [0.0, 1.0, -1.0],
    "abs": [0.0, 1.0, 1.0],
    "mse": [0.0, 0.5, 0.5],  # ½ Δ²
    "low_var_kl": [0.0, math.exp(-1.0), math.e - 2.0],
}
ALIASES = {  # accepted name → the estimator it selects
    "kl": "kl", "k1": "kl", "abs": "abs", "mse": "mse", "k2": "mse", "low_var_kl": "low_var_kl", "k3": "low_var_kl"
}
# d estimate / d log π_θ: k1 → 1; |Δ| → sign Δ; k2 → Δ; k3 → 1 − e^r (token 1: 1 − e^−1; token 2: 1 − e).
EXPECTED_GRAD = {
    "kl": [1.0, 1.0, 1.0],
    "abs": [0.0, 1.0, -1.0],
    "mse": [0.0, 1.0, -1.0],
    "low_var_kl": [0.0, 1.0 - math.exp(-1.0), 1.0 - math.e],
}


def inputs(dtype=torch.float64):
    log_prob = torch.tensor(LOG_PROB, dtype=dtype, requires_grad=True)
    ref_log_prob = torch.tensor(REF_LOG_PROB, dtype=dtype, requires_grad=True)
    return log_prob, ref_log_prob


def test_accepted_types_are_the_plain_names_and_their_plus_variants():
    assert set(KL_TYPES) == set(ALIASES) | {f"{name}+" for name in ALIASES}


@pytest.mark.parametrize("kl_type", list(ALIASES))
def test_values_and_gradients_hand_worked(kl_type):
    log_prob, ref_log_prob = inputs()
    kl = kl_penalty(log_prob, ref_log_prob, kl_type)
    torch.testing.assert_close(kl, torch.tensor(EXPECTED[ALIASES[kl_type]], dtype=torch.float64))
    kl.sum().backward()
    expected_grad = torch.tensor(EXPECTED_GRAD[ALIASES[kl_type]], dtype=torch.float64)
    torch.testing.assert_close(log_prob.grad, expected_grad)
    # Every estimator is a function of Δ alone, so the reference gets the opposite gradient.
    torch.testing.assert_close(ref_log_prob.grad, -expected_grad)


@pytest.mark.parametrize("kl_type", list(ALIASES))
def test_plus_variants_keep_the_value_and_take_the_k2_gradient(kl_type):
    log_prob, ref_log_prob = inputs()
    kl = kl_penalty(log_prob, ref_log_prob, f"{kl_type}+")
    torch.testing.assert_close(kl, torch.tensor(EXPECTED[ALIASES[kl_type]], dtype=torch.float64))
    kl.sum().backward()
    torch.testing.assert_close(log_prob.grad, torch.tensor([0.0, 1.0, -1.0], dtype=torch.float64))  # Δ
    torch.testing.assert_close(ref_log_prob.grad, torch.tensor([0.0, -1.0, 1.0], dtype=torch.float64))


def test_low_var_kl_clamps_log_ratio_and_value():
    # r = −Δ = ±30: e^20 − 21 and e^−20 + 20 − 1 = 19.0 are both clamped to 10, with zero gradient there.
    # log π_θ = −inf: r = +inf would give e^inf − inf = nan without the ±20 clamp on r; with it, 10.
    log_prob = torch.tensor([-30.0, 0.0, -torch.inf, -0.5], requires_grad=True)
    ref_log_prob = torch.tensor([0.0, -30.0, 0.0, -0.5])
    kl = kl_penalty(log_prob, ref_log_prob, "k3")
    torch.testing.assert_close(kl, torch.tensor([10.0, 10.0, 10.0, 0.0]))
    kl.sum().backward()
    torch.testing.assert_close(log_prob.grad, torch.zeros(4))


def test_keeps_shape_and_dtype():
    log_prob = torch.randn(2, 5, dtype=torch.bfloat16)
    kl = kl_penalty(log_prob, log_prob, "low_var_kl")
    assert kl.shape == (2, 5) and kl.dtype == torch.bfloat16
    assert (kl == 0).all()  # Δ = 0 → 0 for every estimator


def test_rejects_unknown_type_and_mismatched_shapes():
    with pytest.raises(ValueError, match=r"kl_type must be one of \('kl', 'k1', .*'k3\+'\), got 'full'"):
        kl_penalty(torch.zeros(3), torch.zeros(3), "full")
    with pytest.raises(ValueError, match="got 'K3'"):
        kl_penalty(torch.zeros(3), torch.zeros(3), "K3")
    with pytest.raises(ValueError, match=r"log_prob has shape \(2, 3\) but ref_log_prob has \(3,\)"):
        kl_penalty(torch.zeros(2, 3), torch.zeros(3), "k1")
