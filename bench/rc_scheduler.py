"""Async RC scheduling vs phase barriers (RC's verl loop) vs the ideal bound, on a simulated engine.

The engine is simulated so that the *scheduling* is what is measured: it has ``--slots`` decode slots (continuous
batching width) and a turn holds a slot for ``length x --token-ms`` milliseconds. Turn lengths are long-tailed
(lognormal, clipped at the budget), like real reasoning traces, and are pre-drawn per (chain, turn), so all three
runs do exactly the same work. The real ``CycleScheduler`` drives the async run; the barrier run issues the same
turns phase by phase (every chain's reasoning turn, wait for all, every chain's summary, wait for all, ...).

Ideal bound = max(longest chain's critical path, total work / slots): no schedule on this engine can beat it.
With at least as many slots as chains (vLLM's default max_num_seqs is 256) the bound is tight; with fewer slots
it is not reachable without knowing turn lengths in advance, so that row shows how far a FIFO engine queue gets.

    python bench/rc_scheduler.py                      # 256 chains x T=4 on 256 and on 64 slots
    python bench/rc_scheduler.py --chains 64 --cycles 2 --slots 64
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time

from flash_rc.rc.scheduler import CycleConfig, CycleScheduler
from flash_rc.rc.state import ChainState
from flash_rc.types import Completion


class SimulatedEngine:
    """``slots`` concurrent requests; a request sleeps for its pre-drawn length times the per-token time."""

    def __init__(self, lengths: dict[tuple[str, str, int], int], slots: int, token_ms: float):
        self.lengths, self.token_s = lengths, token_ms / 1000
        self.slots = asyncio.Semaphore(slots)

    async def agenerate(self, messages, sampling, request_id=None):
        problem, _, turn_type, number, _ = request_id.rsplit("|", 4)
        kind = "summary" if turn_type == "summarization" else "reasoning"
        length = self.lengths[(problem, kind, int(number))]
        await self.decode(length)
        return [Completion([0], [0] * length, kind, [0.0] * length, "stop", 0, 0)]

    async def decode(self, length: int) -> float:
        """Hold one slot for ``length`` tokens; returns when decoding started (after the wait for a slot)."""
        async with self.slots:
            started = time.perf_counter()
            await asyncio.sleep(length * self.token_s)
        return started


def reasoning_length(rng: random.Random, h_r: int) -> int:
    """A reasoning turn's length: lognormal, median ~2k tokens, clipped at the budget H_R."""
    return min(h_r, int(rng.lognormvariate(7.6, 0.9)))


def summary_length(rng: random.Random, h_s: int) -> int:
    """A summary's length: lognormal, median ~400 tokens, clipped at the budget H_S."""
    return min(h_s, int(rng.lognormvariate(6.0, 0.6)))


def draw_lengths(chains: int, cycles: int, h_r: int, h_s: int, seed: int) -> dict[tuple[str, str, int], int]:
    rng = random.Random(seed)
    lengths = {}
    for c in range(chains):
        for t in range(1, cycles + 1):
            lengths[(f"p{c}", "reasoning", t)] = reasoning_length(rng, h_r)
            lengths[(f"p{c}", "summary", t)] = summary_length(rng, h_s)
    return lengths


def new_chains(n: int) -> list[ChainState]:
    return [ChainState(problem_id=f"p{i}", sample_id=0, problem=f"p{i}") for i in range(n)]


async def run_async(scheduler: CycleScheduler, chains: list[ChainState]) -> None:
    await scheduler.run(chains)


async def run_barrier(scheduler: CycleScheduler, chains: list[ChainState], cycles: int) -> None:
    for _ in range(cycles):
        for turn_type in ("reasoning", "summarization"):
            await asyncio.gather(*(scheduler.turn(chain, turn_type) for chain in chains))


def ideal_seconds(lengths, chains: int, cycles: int, slots: int, token_ms: float) -> float:
    per_chain = [sum(lengths[(f"p{c}", k, t)] for k in ("reasoning", "summary") for t in range(1, cycles + 1))
                 for c in range(chains)]
    return max(max(per_chain), sum(per_chain) / slots) * token_ms / 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chains", type=int, default=256)
    parser.add_argument("--cycles", type=int, default=4)
    parser.add_argument("--slots", type=int, nargs="+", default=[256, 64],
                        help="engine decode slots (continuous batching width); one run per value")
    parser.add_argument("--token-ms", type=float, default=0.02, help="simulated milliseconds per generated token")
    parser.add_argument("--h-r", type=int, default=16384)
    parser.add_argument("--h-s", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    lengths = draw_lengths(args.chains, args.cycles, args.h_r, args.h_s, args.seed)
    config = CycleConfig(num_cycles=args.cycles, max_thinking_tokens=args.h_r, max_summary_tokens=args.h_s,
                         max_concurrent_chains=args.chains)
    print(f"{args.chains} chains x T={args.cycles}, lognormal turn lengths (H_R={args.h_r}, H_S={args.h_s}), "
          f"{args.token_ms} ms/token")
    print(f"{'slots':>5}  {'ideal s':>8}  {'async s':>8}  {'barrier s':>9}  {'async/ideal':>11}  {'barrier/async':>13}")
    for slots in args.slots:
        timings = {}
        for name in ("async", "barrier"):
            engine = SimulatedEngine(lengths, slots, args.token_ms)
            scheduler, chains = CycleScheduler(engine, config), new_chains(args.chains)
            start = time.perf_counter()
            run = run_async(scheduler, chains) if name == "async" else run_barrier(scheduler, chains, args.cycles)
            asyncio.run(run)
            timings[name] = time.perf_counter() - start
            assert all(len(c.turns) == 2 * args.cycles for c in chains), f"{name}: chains did not finish"
        ideal = ideal_seconds(lengths, args.chains, args.cycles, slots, args.token_ms)
        print(f"{slots:>5}  {ideal:>8.3f}  {timings['async']:>8.3f}  {timings['barrier']:>9.3f}  "
              f"{timings['async'] / ideal:>10.3f}x  {timings['barrier'] / timings['async']:>12.2f}x")
    print("targets (256 chains, T=4, engine width >= chains): barrier/async >= 1.5x, async/ideal <= 1.10x")


if __name__ == "__main__":
    main()
