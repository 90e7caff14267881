"""Routing by data_source (verl names, Reasoning360 prefixes, registrations) and the verl-compatible entry points."""

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from flash_rc.rewards import router
from flash_rc.rewards.router import CODE_TESTS, GSM8K, MATH, MATH_DAPO, ScoreRequest, ScorerRoute, \
    UnknownDataSourceError, compute_score, compute_score_async, make_job, register_scorer, resolve_route, score_batch


@pytest.fixture
def clean_registry(monkeypatch):
    monkeypatch.setattr(router, "_registered_exact", {})
    monkeypatch.setattr(router, "_registered_prefixes", {})


@pytest.mark.parametrize("data_source, route", [
    ("openai/gsm8k", GSM8K),
    ("math_dapo", MATH_DAPO), ("math", MATH_DAPO), ("math_dapo_reasoning", MATH_DAPO),  # verl sends "math" to DAPO
    ("aime", MATH_DAPO), ("aime-2024", MATH_DAPO), ("aime25", MATH_DAPO),
    ("lighteval/MATH", MATH), ("HuggingFaceH4/MATH-500", MATH), ("DigitalLearningGmbH/MATH-lighteval", MATH),
    ("codecontests", CODE_TESTS), ("taco", CODE_TESTS),
    ("math__combined_54.4k", MATH), ("codegen__leetcode2k", CODE_TESTS),  # Reasoning360 prefixes
])
def test_builtin_routes(data_source, route):
    assert resolve_route(data_source) is route


def test_reasoning360_math_metric_picks_the_scorer():
    assert resolve_route("math__dapo_or1", {"reward_metric": "math_dapo"}) is MATH_DAPO
    assert resolve_route("math__dapo_or1", {"reward_metric": "naive_dapo"}) is MATH
    with pytest.raises(UnknownDataSourceError, match="reward_metric 'math_llm_judge' is not supported"):
        resolve_route("math__x", {"reward_metric": "math_llm_judge"})


@pytest.mark.parametrize("data_source", ["gsm8k_typo", "logic__zebra_puzzle", "", "MATH"])
def test_unknown_data_source_is_a_clear_error(data_source):
    with pytest.raises(UnknownDataSourceError, match="no scorer for data_source .* known: .*openai/gsm8k"):
        resolve_route(data_source)
    with pytest.raises(UnknownDataSourceError, match="must be a string"):
        resolve_route(None)


def test_registrations_win_and_prefixes_match_longest(clean_registry, scripted_scorer):
    custom = ScorerRoute(scripted_scorer, timeout_s=1.0)
    register_scorer("openai/gsm8k", custom)
    register_scorer("logic__", custom, prefix=True)
    assert resolve_route("openai/gsm8k") is custom
    assert resolve_route("logic__zebra_puzzle") is custom
    specific = ScorerRoute(scripted_scorer, timeout_s=2.0)
    register_scorer("logic__zebra", specific, prefix=True)
    assert resolve_route("logic__zebra_puzzle") is specific  # the longest registered prefix wins


@pytest.mark.parametrize("target, message", [
    ("no_colon", "must look like"),
    ("/does/not/exist.py:compute_score", "does not exist"),
    ("flash_rc.rewards.gsm8k:no_such_function", "has no callable"),
    ("flash_rc.no_such_module:f", "No module named"),
])
def test_bad_scorer_targets_fail_at_registration(clean_registry, target, message):
    with pytest.raises((ValueError, ImportError), match=message):
        register_scorer("x", ScorerRoute(target, timeout_s=1.0))


def test_make_job_validates_kwargs_in_the_caller():
    job = make_job(ScoreRequest("openai/gsm8k", "#### 1", "1", None, {"method": "flexible", "timeout_s": 0.5,
                                                                       "format_weight": 0.1}))
    assert (job.kwargs, job.timeout_s, job.format_weight) == ({"method": "flexible"}, 0.5, 0.1)
    with pytest.raises(TypeError, match="does not accept \\['methd'\\]"):
        make_job(ScoreRequest("openai/gsm8k", "#### 1", "1", None, {"methd": "flexible"}))
    with pytest.raises(ValueError, match="timeout_s must be positive"):
        make_job(ScoreRequest("openai/gsm8k", "#### 1", "1", None, {"timeout_s": 0}))


def test_math_verify_timeout_is_not_the_pools_limit():
    # timeout_s is the pool's hard limit for the call; verify_timeout_s is math-verify's own, passed to the scorer
    job = make_job(ScoreRequest("lighteval/MATH", "\\boxed{1}", "1", None, {"timeout_s": 3, "verify_timeout_s": 1}))
    assert (job.kwargs, job.timeout_s) == ({"verify_timeout_s": 1}, 3.0)
    # a comparison sympy never finishes: math-verify gives up after 1 s, before the pool's 3 s kill ("timeout")
    result = compute_score("lighteval/MATH", "\\boxed{9^{9^{9^{9}}}}", "4", timeout_s=3, verify_timeout_s=1)
    assert result["reason"] == "wrong_answer"


def test_compute_score_with_verls_calling_convention():
    # verl calls the custom reward function with these keyword names and merges reward_kwargs in.
    result = compute_score(data_source="openai/gsm8k", solution_str="so #### 72", ground_truth="72",
                           extra_info={"split": "test", "index": 0})
    assert result == {"score": 1.0, "acc": True, "pred": "72", "reason": "correct"}
    assert compute_score("openai/gsm8k", "so 72", "72", method="flexible")["acc"]
    assert compute_score("openai/gsm8k", b"so \xff #### 72", "72")["acc"]  # raw bytes with invalid UTF-8
    # verl adds these for its own reward-model plumbing; they never reach the scorer
    plumbing = {"reward_router_address": None, "reward_model_tokenizer": None}
    assert compute_score("openai/gsm8k", "#### 72", "72", **plumbing)["acc"]
    with pytest.raises(UnknownDataSourceError):
        compute_score("nope", "x", "y")


def test_format_weight_adds_to_any_scorer():
    text = "<reasoning>add</reasoning><answer>#### 72</answer>"
    assert compute_score("openai/gsm8k", text, "72", format_weight=0.5)["score"] == 1.5
    assert compute_score("openai/gsm8k", text, "71", format_weight=0.5) == {
        "score": 0.5, "acc": False, "pred": "72", "reason": "wrong_answer; format_ok"}


def test_compute_score_from_many_threads():
    def score(i):
        return compute_score("openai/gsm8k", f"#### {i}", str(i if i % 3 else -1))["acc"]

    with ThreadPoolExecutor(max_workers=8) as executor:
        accs = list(executor.map(score, range(400)))
    assert accs == [i % 3 != 0 for i in range(400)]


def test_compute_score_async_under_gather():
    async def main():
        return await asyncio.gather(*(compute_score_async("math_dapo", f"Answer: {i}", "3") for i in range(50)))

    results = asyncio.run(main())
    assert [r["score"] for r in results] == [1.0 if i == 3 else -1.0 for i in range(50)]


def test_score_batch_mixes_scorers_in_order():
    tests = json.dumps([{"stdin": "2", "expected_output": "4"}])
    requests = [
        ScoreRequest("openai/gsm8k", "#### 5", "5"),
        ScoreRequest("math_dapo", "Answer: \\frac12", "\\frac{1}{2}"),
        ScoreRequest("lighteval/MATH", "\\boxed{0.5}", "\\frac{1}{2}"),
        ScoreRequest("codegen__toy", "```python\nprint(int(input()) * 2)\n```", tests, None, {"test_timeout_s": 10}),
        ScoreRequest("openai/gsm8k", "#### 6", "5"),
    ]
    assert [r["score"] for r in score_batch(requests)] == [1.0, 1.0, 1.0, 2.0, 0.0]


def test_score_batch_rejects_bad_requests_before_running():
    with pytest.raises(UnknownDataSourceError, match="request 1 \\(data_source='unknown'\\)"):
        score_batch([ScoreRequest("openai/gsm8k", "#### 1", "1"), ScoreRequest("unknown", "x", "y")])


def test_rc_answer_route_falls_back_to_gsm8k_format():
    assert compute_score("flash_rc/rc_answer", "so\n#### 1,200", "1200")["acc"] is True
    assert compute_score("flash_rc/rc_answer", "\\boxed{\\frac{1}{2}}", "0.5")["acc"] is True
