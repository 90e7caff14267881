"""Reward throughput and the cost of timeouts, measured side by side in one run.

    .venv/bin/python bench/rewards.py [--gsm8k ../shared/data/gsm8k] [--workers 2] [--repeats 5]

Prints, for a batch of 1,000 real GSM8K model solutions (example_model_solutions.jsonl, "A: n" rewritten to
"#### n"):
* in-process scoring (no time limit) vs the router's pool (hard per-call limit), responses/s;
* one-at-a-time ``compute_score`` calls (the verl per-sample path), calls/s;
and, for a scorer that hangs, how long a timed-out call really takes against its limit -- alone and inside the
1,000-response batch -- plus the sandbox's cost per code test and per timed-out code test.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from flash_rc.rewards import gsm8k
from flash_rc.rewards.code_tests import compute_score as code_score
from flash_rc.rewards.pool import RewardPool
from flash_rc.rewards.router import ScoreRequest, ScorerRoute, compute_score, default_pool, register_scorer, \
    score_batch

GSM8K_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "gsm8k"
HANGING_SCORER = "def compute_score(solution_str, ground_truth, extra_info=None):\n    while True:\n        pass\n"


def gsm8k_requests(gsm8k_dir: Path, count: int) -> list[ScoreRequest]:
    requests = []
    for line in (gsm8k_dir / "example_model_solutions.jsonl").read_text().splitlines():
        row = json.loads(line)
        ground_truth = row["ground_truth"].rsplit("A: ", 1)[1].strip()
        for model in ("6b_finetuning", "175b_verification"):
            requests.append(ScoreRequest("openai/gsm8k", row[model]["solution"].replace("A: ", "#### "), ground_truth))
    return requests[:count]


def best_and_median(fn, repeats: int) -> tuple[float, float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times), statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gsm8k", type=Path, default=GSM8K_DIR, help="dir with example_model_solutions.jsonl")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    requests = gsm8k_requests(args.gsm8k, 1000)
    n = len(requests)

    _, direct = best_and_median(lambda: [gsm8k.compute_score(r.solution_str, r.ground_truth) for r in requests],
                                args.repeats)
    with tempfile.TemporaryDirectory() as scratch, RewardPool(num_workers=args.workers) as pool:
        score_batch(requests, pool=pool)  # warm-up: workers started, scorers imported
        _, pooled = best_and_median(lambda: score_batch(requests, pool=pool), args.repeats)
        compute_score("openai/gsm8k", "#### 1", "1")  # starts the process-wide pool compute_score uses
        default_pool().wait_ready()
        start = time.perf_counter()
        for request in requests[:300]:
            compute_score(request.data_source, request.solution_str, request.ground_truth)
        single = (time.perf_counter() - start) / 300

        print(f"GSM8K scoring, batch of {n} real model solutions ({args.workers} pool workers, median of "
              f"{args.repeats}):")
        print(f"  in-process, no time limit : {n / direct:>10,.0f} responses/s")
        print(f"  router pool, hard limit   : {n / pooled:>10,.0f} responses/s   ({pooled / direct:.1f}x the "
              f"in-process time; target >= 2,000/s)")
        print(f"  compute_score one by one  : {1 / single:>10,.0f} calls/s       ({single * 1e6:.0f} us per call)")

        scorer = Path(scratch) / "hang.py"
        scorer.write_text(HANGING_SCORER)
        print("\nTimeouts (a scorer that never returns):")
        for limit in (0.5, 1.0):
            register_scorer(f"bench_hang_{limit}", ScorerRoute(f"{scorer}:compute_score", timeout_s=limit))
            hang = ScoreRequest(f"bench_hang_{limit}", "x", "y")
            score_batch([hang], pool=pool)  # import the scorer file once, outside the measurement
            pool.wait_ready()  # measure the timeout, not the replacement worker's start-up
            alone, _ = best_and_median(lambda: score_batch([hang], pool=pool), 1)
            pool.wait_ready()
            mixed, _ = best_and_median(lambda: score_batch(requests[:500] + [hang] + requests[500:], pool=pool), 1)
            print(f"  limit {limit:.1f} s: alone {alone:.3f} s (+{(alone - limit) * 1000:.0f} ms); inside the "
                  f"{n}-response batch {mixed:.3f} s (limit + {(mixed - limit) * 1000:.0f} ms for the rest)")

    program = "```python\nimport sys\nprint(sum(map(int, sys.stdin.read().split())))\n```"
    tests = [{"stdin": f"{i} {i}", "expected_output": str(2 * i)} for i in range(5)]
    code_score(program, tests)  # probes the sandbox's interpreter once
    runs, _ = best_and_median(lambda: code_score(program, tests), 3)
    print(f"\nCode tests (sandboxed Python): {runs / len(tests) * 1000:.0f} ms per test "
          f"({len(tests)} tests per response)")
    for limit in (0.5, 1.0):
        spin = "```python\nwhile True: pass\n```"
        cost, _ = best_and_median(lambda: code_score(spin, tests[:1], test_timeout_s=limit), 1)
        print(f"  infinite loop, per-test limit {limit:.1f} s: {cost:.3f} s (+{(cost - limit) * 1000:.0f} ms)")


if __name__ == "__main__":
    main()
