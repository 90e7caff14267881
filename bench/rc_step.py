"""One RC training rollout phase (online chains + the training states' K samples) under three schedules.

A training step of RC (``flash_rc.rc.states``) decodes B online chains of T reason → summarize cycles, draws N_summ
states per chain, and samples K reasoning turns from each state: B·N_summ·K training sequences. The engine is the
simulated one of ``bench/rc_scheduler.py`` (``--slots`` decode slots, ``--token-ms`` per token, lognormal lengths
clipped at H_R / H_S, pre-drawn so every arm does exactly the same work); a state's request of ``n = K`` holds K
slots, each for its own pre-drawn reasoning length (vLLM decodes the K sequences of ``n=K`` separately). The arms:

* ``rc barriers`` — RC's verl loop: 2T + 1 phases, each waiting for its slowest sequence (every chain's reasoning
  turn, then every chain's summary, ... T times; then one phase with every state's K samples);
* ``ours`` — what ``RCRollout.collect`` does: the real ``CycleScheduler`` runs the chains with no barrier between
  turns, then, once *all* chains finished, every state's request is submitted together;
* ``overlapped`` — a finished chain's states are submitted at once (``CycleScheduler.run(on_chain_done=...)``),
  sharing the engine's FIFO queue with the chains still running. ``RCRollout`` does *not* do this today.

Bound = max(max over chains of (chain's turns + its longest state sample), all tokens / slots) × token time: no
schedule that starts a chain's states after the chain finished can beat it on this engine. The "training tokens
during online" column is the share of the training samples' tokens decoded before the last chain finished.

    python bench/rc_step.py                       # B=64, T=3, N_summ=2, K=8 (RC's script) on 1024 and 256 slots
    python bench/rc_step.py --batch 32 --t-train 2 --n-summ 1 --k 4 --slots 128
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass

from pydantic import ValidationError

from flash_rc.rc.scheduler import CycleScheduler
from flash_rc.rc.state import ChainState
from flash_rc.rc.states import RCTrainConfig, TrainingState, chain_contexts, cycle_config, draw_states
from flash_rc.types import Completion, SamplingConfig
from rc_scheduler import SimulatedEngine, draw_lengths, new_chains, reasoning_length, run_barrier


class StepEngine(SimulatedEngine):
    """The chains' simulated engine, which also serves training states: ``sample_lengths[state key]`` holds the
    pre-drawn length of each of the state's samples; every training sample's (start, end, tokens) is recorded."""

    def __init__(self, lengths: dict[tuple[str, str, int], int], sample_lengths: dict[str, list[int]], slots: int,
                 token_ms: float):
        super().__init__(lengths, slots, token_ms)
        self.sample_lengths = sample_lengths
        self.training_spans: list[tuple[float, float, int]] = []

    async def agenerate(self, messages, sampling, request_id=None):
        if request_id not in self.sample_lengths:
            return await super().agenerate(messages, sampling, request_id)
        lengths = self.sample_lengths[request_id][: sampling.n]
        await asyncio.gather(*(self._training_sample(length) for length in lengths))
        return [Completion([0], [0] * n, "reasoning", [0.0] * n, "stop", 0, 0) for n in lengths]

    async def _training_sample(self, length: int) -> None:
        started = await self.decode(length)
        self.training_spans.append((started, time.perf_counter(), length))


def draw_sample_lengths(chains: int, cycles: int, k: int, h_r: int, seed: int) -> dict[str, list[int]]:
    """K reasoning lengths for every possible state (problem ``p{c}``, sample 0, index j < T) — a state's key."""
    rng = random.Random(f"{seed}|samples")
    return {f"p{c}|0|{j}": [reasoning_length(rng, h_r) for _ in range(k)]
            for c in range(chains) for j in range(cycles)}


def chain_states(chain: ChainState, contexts: list[str], rc: RCTrainConfig, seed: int) -> list[TrainingState]:
    """The chain's N_summ states, drawn from an RNG of its own: every arm trains the same states (which indices are
    drawn does not depend on the contexts)."""
    return draw_states(chain, contexts, rc, random.Random(f"{seed}|{chain.problem_id}"))


@dataclass
class Timeline:
    step_s: float
    """From the first request to the last training sample."""
    online_s: float
    """From the first request to the end of the last chain."""
    training_tokens: int
    """Tokens of every training sample the engine decoded."""
    training_tokens_during_online: float
    """Share of them decoded before the last chain finished."""

    @property
    def training_s(self) -> float:
        """Wall time after the last chain finished (all of the training phase unless it overlaps the chains)."""
        return self.step_s - self.online_s


class Step:
    """One arm's run: a fresh engine and scheduler, the chains, and their states' requests."""

    def __init__(self, args: argparse.Namespace, rc: RCTrainConfig, lengths: dict[tuple[str, str, int], int],
                 sample_lengths: dict[str, list[int]], slots: int):
        self.args, self.rc = args, rc
        self.engine = StepEngine(lengths, sample_lengths, slots, args.token_ms)
        self.scheduler = CycleScheduler(self.engine, cycle_config(rc, args.seed))
        self.chains = new_chains(args.batch)
        self.sampling = SamplingConfig(max_tokens=rc.max_thinking_tokens, n=rc.k)

    async def sample_states(self, chain: ChainState) -> None:
        """K samples of each of the chain's states (the simulated engine reads only the request id and ``n``)."""
        states = chain_states(chain, chain_contexts(chain, self.rc.mode, ""), self.rc, self.args.seed)
        await asyncio.gather(*(self.engine.agenerate(s.context, self.sampling, request_id=s.key) for s in states))

    async def ours(self) -> float:
        return await self._states_after(self.scheduler.run(self.chains))

    async def rc_barriers(self) -> float:
        return await self._states_after(run_barrier(self.scheduler, self.chains, self.rc.t_train))

    async def _states_after(self, online: Awaitable[object]) -> float:
        """The online phase, then every chain's states together; returns when the online phase ended."""
        await online
        online_end = time.perf_counter()
        await asyncio.gather(*(self.sample_states(chain) for chain in self.chains))
        return online_end

    async def overlapped(self) -> float:
        training: list[asyncio.Future] = []
        await self.scheduler.run(self.chains, on_chain_done=lambda c: training.append(
            asyncio.ensure_future(self.sample_states(c))))
        online_end = time.perf_counter()
        await asyncio.gather(*training)
        return online_end

    def timeline(self, arm: Callable[[], Coroutine[None, None, float]]) -> Timeline:
        start = time.perf_counter()
        online_end = asyncio.run(arm())
        end = time.perf_counter()
        spans = self.engine.training_spans
        assert all(len(c.turns) == 2 * self.rc.t_train for c in self.chains), "chains did not finish"
        assert len(spans) == self.args.batch * self.rc.n_summ * self.rc.k, "training samples missing"
        tokens = sum(n for _, _, n in spans)
        during = sum(n * min(max((online_end - s) / (e - s), 0.0), 1.0) for s, e, n in spans if e > s)
        return Timeline(end - start, online_end - start, tokens, during / tokens)


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=positive, default=64, help="B: problems, one online chain each")
    parser.add_argument("--t-train", type=positive, default=3, help="T_train: reason -> summarize cycles per chain")
    parser.add_argument("--n-summ", type=positive, default=2, help="N_summ: training states per chain")
    parser.add_argument("--k", type=positive, default=8, help="K: reasoning samples per state")
    parser.add_argument("--slots", type=positive, nargs="+", default=[1024, 256],
                        help="engine decode slots (RC's yaml max_num_seqs=1024, vLLM's default 256); one run each")
    parser.add_argument("--token-ms", type=float, default=0.02, help="simulated milliseconds per generated token")
    parser.add_argument("--h-r", type=positive, default=16384)
    parser.add_argument("--h-s", type=positive, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    try:
        rc = RCTrainConfig(enable=True, t_train=args.t_train, n_summ=args.n_summ, k=args.k,
                           max_thinking_tokens=args.h_r, max_summary_tokens=args.h_s, max_concurrent_chains=args.batch)
    except ValidationError as error:  # n_summ > t_train: the states do not exist
        parser.error(error.errors()[0]["msg"].removeprefix("Value error, "))

    lengths = draw_lengths(args.batch, args.t_train, args.h_r, args.h_s, args.seed)
    sample_lengths = draw_sample_lengths(args.batch, args.t_train, args.k, args.h_r, args.seed)
    blank = [""] * (args.t_train + 1)
    trained = {c.problem_id: [sample_lengths[s.key] for s in chain_states(c, blank, rc, args.seed)]
               for c in new_chains(args.batch)}
    path = {problem: sum(n for (p, _, _), n in lengths.items() if p == problem) for problem in trained}
    online_tokens, training_tokens = sum(lengths.values()), sum(sum(map(sum, s)) for s in trained.values())
    longest = max(path[p] + max(max(s) for s in states) for p, states in trained.items())

    print(f"B={args.batch} chains x T={args.t_train}, N_summ={args.n_summ} states x K={args.k} samples "
          f"({args.batch * args.n_summ * args.k} training sequences), lognormal lengths (H_R={args.h_r}, "
          f"H_S={args.h_s}), {args.token_ms} ms/token")
    total = online_tokens + training_tokens
    print(f"tokens (the same in every arm): online {online_tokens:,} ({online_tokens / total:.0%}), "
          f"training {training_tokens:,} ({training_tokens / total:.0%})")
    print(f"{'slots':>5}  {'arm':<11}  {'step s':>7}  {'online s':>8}  {'training s':>10}  {'online share':>12}  "
          f"{'training tokens during online':>29}  {'step / ours':>11}")
    for slots in args.slots:
        timelines = {}
        for arm in ("rc barriers", "ours", "overlapped"):
            step = Step(args, rc, lengths, sample_lengths, slots)
            timelines[arm] = step.timeline(getattr(step, arm.replace(" ", "_")))
            assert timelines[arm].training_tokens == training_tokens, f"{arm}: other states than the bound's"
        for arm, t in timelines.items():
            print(f"{slots:>5}  {arm:<11}  {t.step_s:>7.3f}  {t.online_s:>8.3f}  {t.training_s:>10.3f}  "
                  f"{t.online_s / t.step_s:>12.0%}  {t.training_tokens_during_online:>29.0%}  "
                  f"{t.step_s / timelines['ours'].step_s:>10.2f}x")
        bound = max(longest, total / slots) * args.token_ms / 1000
        print(f"{slots:>5}  {'bound':<11}  {bound:>7.3f}  {'':>8}  {'':>10}  {'':>12}  {'':>29}  "
              f"{bound / timelines['ours'].step_s:>10.2f}x")


if __name__ == "__main__":
    main()
