"""Route a sample to its scorer by ``data_source`` and score it under a hard time limit.

Why: verl calls one ``compute_score(data_source, solution_str, ground_truth, extra_info)`` for every sample of a mixed
batch; Reasoning360 showed that a ``<domain>__<name>`` naming scheme keeps multi-domain data routable. This module is
that single entry point, usable as verl's ``reward.custom_reward_function`` (path ``pkg://flash_rc.rewards.router``
or this file, name ``compute_score``).

Routing, first match wins:
1. routes added with ``register_scorer`` (exact names, then prefixes);
2. verl's names: ``openai/gsm8k`` -> gsm8k; ``math_dapo``, ``math``, ``math_dapo_reasoning``, ``aime*`` -> math_dapo;
   ``lighteval/MATH``, ``DigitalLearningGmbH/MATH-lighteval``, ``HuggingFaceH4/MATH-500`` -> math (math-verify);
   ``codecontests``, ``apps``, ``codeforces``, ``taco`` -> code_tests; ``arithmetic`` (``flash-rc data arithmetic``)
   -> arithmetic;
3. Reasoning360 prefixes: ``math__*`` -> math (or math_dapo when ``extra_info["reward_metric"] == "math_dapo"``),
   ``codegen__*`` -> code_tests.
Anything else raises ``UnknownDataSourceError`` before any work is queued.

Every call runs in the process pool of ``pool.py`` with the route's wall-clock limit (override per call with
``timeout_s=``); a call that exceeds it scores 0 with reason ``timeout``. Scorers' own limits have their own names
(math's ``verify_timeout_s``, code_tests' ``test_timeout_s``) and should stay inside it. Remaining keyword arguments
(verl's ``reward_kwargs``) go to the scorer, checked against its signature here so a typo fails loudly instead of in a
worker; ``format_weight=w`` adds ``w * format_score`` (see ``format.py``). Arguments verl adds for its own reward
models (``reward_router_address``, ...) are dropped.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import importlib.util
import inspect
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any

from flash_rc.errors import UnknownDataSourceError
from flash_rc.rewards.pool import RewardPool
from flash_rc.rewards.types import RewardResult, ScoreRequest, ScorerRoute, ScoringJob

GSM8K = ScorerRoute("flash_rc.rewards.gsm8k:compute_score", timeout_s=2.0)
MATH_DAPO = ScorerRoute("flash_rc.rewards.math_dapo:compute_score", timeout_s=2.0)
MATH = ScorerRoute("flash_rc.rewards.math:compute_score", timeout_s=15.0)
CODE_TESTS = ScorerRoute("flash_rc.rewards.code_tests:compute_score", timeout_s=30.0)
ARITHMETIC = ScorerRoute("flash_rc.rewards.arithmetic:compute_score", timeout_s=2.0)

# RC decoding's per-turn grader, any dataset: the last \boxed{} answer (what RC's prompts ask for), else GSM8K's
# "#### n", judged by math-verify.
RC_ANSWER = ScorerRoute(MATH.scorer, timeout_s=MATH.timeout_s, kwargs=MappingProxyType({"gsm8k_fallback": True}))

_BUILTIN_EXACT = {
    "flash_rc/rc_answer": RC_ANSWER,
    "openai/gsm8k": GSM8K,
    "math_dapo": MATH_DAPO, "math": MATH_DAPO, "math_dapo_reasoning": MATH_DAPO,
    "lighteval/MATH": MATH, "DigitalLearningGmbH/MATH-lighteval": MATH, "HuggingFaceH4/MATH-500": MATH,
    "codecontests": CODE_TESTS, "apps": CODE_TESTS, "codeforces": CODE_TESTS, "taco": CODE_TESTS,
    "arithmetic": ARITHMETIC,
}
_BUILTIN_PREFIXES = {"aime": MATH_DAPO, "math__": MATH, "codegen__": CODE_TESTS}
_MATH_METRICS = {None: MATH, "default": MATH, "naive_dapo": MATH, "math_verify": MATH, "prime_math": MATH,
                 "math_dapo": MATH_DAPO}

_registered_exact: dict[str, ScorerRoute] = {}
_registered_prefixes: dict[str, ScorerRoute] = {}


def register_scorer(data_source: str, route: ScorerRoute, prefix: bool = False) -> None:
    """Route ``data_source`` (or every data source starting with it, if ``prefix``) to ``route``.

    Registrations win over the built-in table. The scorer is imported now, so a bad target fails here.
    """
    load_scorer(route.scorer)
    (_registered_prefixes if prefix else _registered_exact)[data_source] = route


def _longest_prefix(data_source: str, table: dict[str, ScorerRoute]) -> ScorerRoute | None:
    matches = [prefix for prefix in table if data_source.startswith(prefix)]
    return table[max(matches, key=len)] if matches else None


def resolve_route(data_source: str, extra_info: dict | None = None) -> ScorerRoute:
    """The route for ``data_source``; raises UnknownDataSourceError naming what is known."""
    if not isinstance(data_source, str):
        raise UnknownDataSourceError(f"data_source must be a string, got {type(data_source).__name__}")
    route = (_registered_exact.get(data_source) or _longest_prefix(data_source, _registered_prefixes)
             or _BUILTIN_EXACT.get(data_source) or _longest_prefix(data_source, _BUILTIN_PREFIXES))
    if route is MATH and data_source.startswith("math__"):
        metric = (extra_info or {}).get("reward_metric")
        if metric not in _MATH_METRICS:
            raise UnknownDataSourceError(
                f"data_source {data_source!r}: reward_metric {metric!r} is not supported; use one of "
                f"{sorted(str(name) for name in _MATH_METRICS)} or register_scorer() your own")
        route = _MATH_METRICS[metric]
    if route is None:
        known = sorted(_BUILTIN_EXACT) + [f"{prefix}*" for prefix in _BUILTIN_PREFIXES]
        registered = sorted(_registered_exact) + [f"{prefix}*" for prefix in _registered_prefixes]
        raise UnknownDataSourceError(
            f"no scorer for data_source {data_source!r}; known: {known}; registered: {registered}. "
            "Add one with flash_rc.rewards.router.register_scorer().")
    return route


@functools.cache
def load_scorer(target: str) -> Callable[..., Any]:
    """Import ``module:function`` or ``/path/file.py:function`` (cached per process)."""
    location, _, name = target.rpartition(":")
    if not location or not name:
        raise ValueError(f"scorer target must look like 'package.module:function' or 'file.py:function', "
                         f"got {target!r}")
    if location.endswith(".py"):
        path = Path(location)
        spec = importlib.util.spec_from_file_location(f"flash_rc_custom_scorer_{path.stem}", path)
        if spec is None or not path.is_file():
            raise ValueError(f"scorer file {path} does not exist")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        module = importlib.import_module(location)
    function = getattr(module, name, None)
    if not callable(function):
        raise ValueError(f"scorer target {target!r}: {location} has no callable {name!r}")
    return function


@functools.cache
def _check_kwargs(target: str, names: frozenset[str]) -> None:
    parameters = inspect.signature(load_scorer(target)).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return
    unknown = sorted(names - set(parameters))
    if unknown:
        raise TypeError(f"scorer {target} does not accept {unknown}; it takes {sorted(parameters)}")


def make_job(request: ScoreRequest) -> ScoringJob:
    """Resolve and validate one request (in the caller's process, so errors surface where they were made)."""
    route = resolve_route(request.data_source, request.extra_info)
    kwargs = {**route.kwargs, **request.kwargs}
    timeout_s = kwargs.pop("timeout_s", route.timeout_s)  # checked by ScoringJob
    format_weight = float(kwargs.pop("format_weight", 0.0))
    _check_kwargs(route.scorer, frozenset(kwargs))
    return ScoringJob(route.scorer, request.solution_str, request.ground_truth, request.extra_info, kwargs,
                      format_weight, timeout_s)


_default_pool: RewardPool | None = None
_default_pool_lock = threading.Lock()


def default_pool() -> RewardPool:
    """The process-wide pool (``FLASH_RC_REWARD_WORKERS`` workers, default min(cpus, 8)), started on first use."""
    global _default_pool
    with _default_pool_lock:
        if _default_pool is None or _default_pool.closed:
            workers = int(os.environ.get("FLASH_RC_REWARD_WORKERS", min(os.cpu_count() or 1, 8)))
            _default_pool = RewardPool(num_workers=workers)
        return _default_pool


# Arguments verl's reward managers pass for their own model-based / sandbox-fusion scoring, never meant for a scorer.
VERL_PLUMBING_KWARGS = frozenset({"reward_router_address", "reward_model_tokenizer", "sandbox_fusion_url",
                                  "concurrent_semaphore", "memory_limit_mb"})


def _submit(data_source: str, solution_str: str | bytes, ground_truth: Any, extra_info: dict | None,
            kwargs: dict[str, Any]):
    scorer_kwargs = {name: value for name, value in kwargs.items() if name not in VERL_PLUMBING_KWARGS}
    return default_pool().submit(make_job(ScoreRequest(data_source, solution_str, ground_truth, extra_info,
                                                       scorer_kwargs)))


def compute_score(data_source: str, solution_str: str | bytes, ground_truth: Any, extra_info: dict | None = None,
                  **kwargs: Any) -> RewardResult:
    """verl-compatible entry point: score one sample under its time limit (blocking, thread-safe)."""
    return _submit(data_source, solution_str, ground_truth, extra_info, kwargs).result()


async def compute_score_async(data_source: str, solution_str: str | bytes, ground_truth: Any,
                              extra_info: dict | None = None, **kwargs: Any) -> RewardResult:
    """``compute_score`` for asyncio callers (verl awaits async reward functions instead of using a thread)."""
    return await asyncio.wrap_future(_submit(data_source, solution_str, ground_truth, extra_info, kwargs))


def score_batch(requests: Sequence[ScoreRequest], pool: RewardPool | None = None) -> list[RewardResult]:
    """Score many samples in parallel, results in input order.

    A request that cannot be routed or has bad arguments raises before anything runs; one whose data cannot be sent to
    a worker (an unpicklable ``extra_info``) scores ``bad_request`` alone.
    """
    jobs = []
    for index, request in enumerate(requests):
        try:
            jobs.append(make_job(request))
        except (UnknownDataSourceError, TypeError, ValueError) as exc:
            raise type(exc)(f"request {index} (data_source={request.data_source!r}): {exc}") from exc
    futures = (pool or default_pool()).submit_many(jobs)
    return [future.result() for future in futures]
