"""The reward contract, its normalisation of third-party scorer returns, and the leaf module that holds them."""

import ast
from pathlib import Path

import pytest

import flash_rc.rewards
from flash_rc import errors
from flash_rc.rewards import code_tests, gsm8k, math, math_dapo, router, types
from flash_rc.rewards.types import as_text, failed_result, has_ground_truth, normalize_result, reward_result


def test_reward_result_coerces_types():
    assert reward_result(1, 1, "x", "correct") == {"score": 1.0, "acc": True, "pred": "x", "reason": "correct"}
    assert failed_result("timeout") == {"score": 0.0, "acc": False, "pred": None, "reason": "timeout"}


def test_normalize_float_and_dict_returns():
    assert normalize_result(0.5) == {"score": 0.5, "acc": True, "pred": None, "reason": "ok"}
    assert normalize_result(-1) == {"score": -1.0, "acc": False, "pred": None, "reason": "ok"}
    # verl-style dicts: missing keys are filled, acc defaults to score > 0, pred becomes a string
    assert normalize_result({"score": 1.0, "pred": 3}) == {"score": 1.0, "acc": True, "pred": "3", "reason": "ok"}
    assert normalize_result({"score": 0.0, "acc": True, "reason": "r"})["acc"] is True


@pytest.mark.parametrize("bad, message", [
    ({"acc": True}, "without 'score'"),
    ("1.0", "number or a dict"),
    (True, "number or a dict"),  # a bool is a verdict, not a score
    (None, "number or a dict"),
])
def test_normalize_rejects_non_scores(bad, message):
    with pytest.raises(TypeError, match=message):
        normalize_result(bad)


def test_as_text_decodes_invalid_utf8():
    assert as_text(b"ok \xff\xfe #### 7") == "ok \ufffd\ufffd #### 7"
    assert as_text("already text") == "already text"
    with pytest.raises(TypeError, match="str or bytes"):
        as_text(7)


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return ({node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
            | {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names})


def test_the_pool_and_the_shared_types_do_not_import_the_router():
    """router -> pool is the one dependency between them; the types they share live in the leaf types.py."""
    rewards = Path(flash_rc.rewards.__file__).parent
    assert not {module for module in imported_modules(rewards / "types.py") if module.startswith("flash_rc")}
    assert "flash_rc.rewards.router" not in imported_modules(rewards / "pool.py")
    assert router.ScoringJob is types.ScoringJob and router.UnknownDataSourceError is errors.UnknownDataSourceError


@pytest.mark.parametrize("scorer", [gsm8k.compute_score, math_dapo.compute_score, math.compute_score,
                                    code_tests.compute_score], ids=["gsm8k", "math_dapo", "math", "code_tests"])
@pytest.mark.parametrize("ground_truth", [None, float("nan"), "", " \n", b""])
def test_a_missing_ground_truth_is_never_compared_as_text(scorer, ground_truth):
    for response in ("#### None", "Answer: None", "\\boxed{None}", "Answer: nan", "\\boxed{}", "Answer: "):
        assert scorer(response, ground_truth) == failed_result("no_ground_truth")


def test_ground_truths_that_are_present():
    assert all(map(has_ground_truth, ["0", 0, 0.0, "None", [], {"tests": []}]))
    assert gsm8k.compute_score("#### 0", 0)["acc"]
