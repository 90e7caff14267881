"""What flash_rc's FSDP2 learner costs over a plain FSDP2 PPO loop, and where a whole training step's time goes.

1. Learner throughput (unless ``--skip-throughput``). The same model, loaded the same way (float32 master weights → ``fully_shard`` per
   decoder layer + root, ``MixedPrecisionPolicy(param_dtype, reduce_dtype=float32)``, AdamW), trained on the SAME
   batch with the same micro-batches, in one process (a world of one, gloo on CPU, NCCL on a GPU):

   - ours: ``Learner.update`` — one mini-batch = the whole batch, fixed micro-batch size; log-probs through
     ``flash_rc.kernels.fused_linear_logprob`` (its chunked torch reference off CUDA), loss ``fused_tis_loss``
     (PPO clip × token TIS weights; rollout log-probs = old ones here, so every weight is 1 and the loss is plain
     PPO's);
   - plain: written here — ``logits = model(input_ids, attention_mask).logits``, float32 ``log_softmax`` / gather of
     the response tokens at temperature T, the PPO-clip token-mean loss

         L = Σ_t max(−A ρ_t, −A clip(ρ_t, 1 − ε, 1 + ε)) / N_tokens,   ρ_t = exp(log π_θ − log π_old),  ε = 0.2

     with N_tokens the batch's response tokens (so micro-batch losses sum to the batch loss), backward per
     micro-batch, ``clip_grad_norm_(1.0)``, ``AdamW.step``;
   - no-grad log-probs (π_old): ours ``Learner.log_probs`` vs the plain forward + log_softmax / gather under
     ``torch.no_grad``, both at twice the update's micro-batch (what ``log_probs`` uses).

   After one warm-up of each, ``--steps`` rounds run the arms one after another (drift on a shared machine hits all
   of them alike); tokens/s = (prompt + response tokens of the batch) / seconds, median over the rounds, by wall
   clock and by this process's CPU time (with ``--threads 1`` on a CPU that other jobs share, CPU time leaves out
   the time the OS gave to others: the steadier measure there; on a GPU read the wall clock). The issue's target:
   ours ≥ 0.8 × plain.
   ``--profile ROWS`` adds a torch.profiler table of one more step of each update arm.

2. Phase shares of a training step (``--step-phases RUN_DIR_OR_RECIPE``): a run directory's ``metrics.jsonl`` is
   read as it is; a recipe is run first with ``flash-rc train`` for ``--train-steps`` steps in a temporary directory,
   validation off (``data.val_files=null``, ``trainer.val_before_train=false``, ``trainer.test_freq=-1``) and
   ``trainer.save_freq=-1`` (the checkpoint after the last step is still written; it is not part of a step). Mean
   seconds and share of ``timing_s/step`` for rollout (= generate + reward + batch assembly), old_log_prob, update,
   sync and the rest, over the steps after ``--skip-steps`` warm-up steps; rollout and learner tokens/s.

    python bench/learner.py                                              # SmolLM2-135M, 32 × (~32 + ~64) tokens
    python bench/learner.py --step-phases recipe/local/arithmetic_smollm2_int8.yaml   # + 4 steps of `flash-rc train`
    python bench/learner.py --step-phases checkpoints/flash_rc/arithmetic_smollm2_int8   # an existing run's metrics
    python bench/learner.py --model /models/Qwen2.5-7B-Instruct --batch 256 --prompt-len 512 --response-len 2048 \\
        --micro-batch 4                                                  # a user's GPU
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from flash_rc.learner.batch import TrainSequence

CLIP = 0.2
"""PPO clip ε of both arms."""
TARGET_RATIO = 0.8
"""The least ours / plain update throughput may be."""
TIMING_PHASES = ("rollout", "old_log_prob", "update", "sync")
"""The ``timing_s/*`` phases of one training step (flash_rc/backends/local/trainer.py); the rest is "other"."""


# ---------------------------------------------------------------------- the batch


def make_batch(count: int, prompt_len: int, response_len: int, vocab: int, seed: int = 0) -> list[TrainSequence]:
    """``count`` sequences, prompts of prompt_len ± 25% and responses of 50–100% of response_len tokens, one
    advantage per sequence (±1, like a GRPO group's); rollout log-probs are filled in by :func:`with_old_log_probs`."""
    generator = torch.Generator().manual_seed(seed)
    sequences = []
    for k in range(count):
        prompt = int(torch.randint(max(1, prompt_len * 3 // 4), prompt_len * 5 // 4 + 1, (), generator=generator))
        response = int(torch.randint(max(1, response_len // 2), response_len + 1, (), generator=generator))
        ids = torch.randint(100, vocab, (prompt + response,), generator=generator).tolist()
        sequences.append(TrainSequence(tuple(ids[:prompt]), tuple(ids[prompt:]), (0.0,) * response,
                                       advantage=1.0 if k % 2 else -1.0))
    return sequences


def consecutive_groups(count: int, size: int) -> list[list[int]]:
    """Micro-batches of ``size`` consecutive sequences: how ``Learner`` cuts a fixed-size mini-batch."""
    return [list(range(start, min(start + size, count))) for start in range(0, count, size)]


def with_old_log_probs(sequences: list[TrainSequence], old: list[torch.Tensor]) -> list[TrainSequence]:
    """The sequences with rollout log-probs = π_old's (TIS weights 1: ours computes the plain PPO loss)."""
    return [TrainSequence(s.prompt_token_ids, s.response_token_ids, tuple(o.tolist()), s.advantage)
            for s, o in zip(sequences, old)]


# ---------------------------------------------------------------------- ours


def build_ours(model_path: Path, world, batch: int, micro_batch: int, param_dtype: str, lr: float):
    from flash_rc.algo.rollout_correction import RolloutCorrectionConfig
    from flash_rc.learner.config import ActorModelKeys, ActorSection
    from flash_rc.learner.learner import Learner, LearnerSettings

    actor = ActorSection.model_validate({
        "ppo_mini_batch_size": batch, "ppo_micro_batch_size_per_gpu": micro_batch, "clip_ratio_low": CLIP,
        "clip_ratio_high": CLIP, "loss_agg_mode": "token-mean", "grad_clip": 1.0, "optim": {"lr": lr},
        "fsdp_config": {"mixed_precision": {"param_dtype": param_dtype}},
    })
    settings = LearnerSettings(actor=actor, model=ActorModelKeys(), correction=RolloutCorrectionConfig(),
                               total_steps=1000)
    return Learner(model_path, settings, world)


# ---------------------------------------------------------------------- plain


@dataclass
class PlainMicroBatch:
    """Right-padded model inputs and, per predicted position (row, 0..L-2), target, response mask, π_old, A."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    targets: torch.Tensor
    mask: torch.Tensor
    old: torch.Tensor
    advantages: torch.Tensor


def plain_micro_batch(sequences: list[TrainSequence], group: list[int], device) -> PlainMicroBatch:
    rows = [sequences[i] for i in group]
    width = max(s.num_tokens for s in rows)
    input_ids = torch.zeros((len(rows), width), dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width - 1), dtype=torch.bool)
    old = torch.zeros((len(rows), width - 1))
    for r, s in enumerate(rows):
        prompt, total = len(s.prompt_token_ids), s.num_tokens
        input_ids[r, :total] = torch.tensor(s.prompt_token_ids + s.response_token_ids)
        attention_mask[r, :total] = 1
        mask[r, prompt - 1:total - 1] = True  # logits at position j predict token j + 1
        old[r, prompt - 1:total - 1] = torch.tensor(s.rollout_log_probs)
    advantages = torch.tensor([[s.advantage] for s in rows])
    batch = PlainMicroBatch(input_ids, attention_mask, input_ids[:, 1:], mask, old, advantages)
    return PlainMicroBatch(*(t.to(device) for t in vars(batch).values()))


class PlainLoop:
    """The FSDP2 PPO loop a user writes without flash_rc (see the module docstring)."""

    def __init__(self, model_path: Path, world, param_dtype: str, lr: float, betas, weight_decay: float):
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        from transformers import AutoModelForCausalLM

        from flash_rc.learner.model import PARAM_DTYPES, decoder_layers

        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32,
                                                     attn_implementation="sdpa").to(world.device)
        model.config.use_cache = False
        policy = MixedPrecisionPolicy(param_dtype=PARAM_DTYPES[param_dtype], reduce_dtype=torch.float32)
        for layer in decoder_layers(model):
            fully_shard(layer, mesh=world.mesh, mp_policy=policy)
        fully_shard(model, mesh=world.mesh, mp_policy=policy)
        self.model, self.device = model, world.device
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=tuple(betas), weight_decay=weight_decay)

    def response_log_probs(self, batch: PlainMicroBatch, temperature: float) -> torch.Tensor:
        logits = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
        log_probs = torch.log_softmax(logits.float() / temperature, dim=-1)
        return log_probs.gather(-1, batch.targets[..., None]).squeeze(-1)

    def update(self, sequences: list[TrainSequence], groups: list[list[int]], temperature: float) -> dict:
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        tokens = sum(len(s.response_token_ids) for s in sequences)
        total_loss = 0.0
        for group in groups:
            batch = plain_micro_batch(sequences, group, self.device)
            ratio = torch.exp(self.response_log_probs(batch, temperature) - batch.old)
            surrogate = torch.maximum(-batch.advantages * ratio,
                                      -batch.advantages * torch.clamp(ratio, 1 - CLIP, 1 + CLIP))
            loss = (surrogate * batch.mask).sum() / tokens
            loss.backward()
            total_loss += float(loss.detach())
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        return {"loss": total_loss, "grad_norm": float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)}

    @torch.no_grad()
    def log_probs(self, sequences: list[TrainSequence], groups: list[list[int]], temperature: float) -> list:
        self.model.eval()
        out = []
        for group in groups:
            batch = plain_micro_batch(sequences, group, self.device)
            values = self.response_log_probs(batch, temperature)
            out += [row[mask] for row, mask in zip(values, batch.mask)]
        return out


# ---------------------------------------------------------------------- part 1: throughput


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    wall: float
    """Wall-clock seconds."""
    cpu: float
    """CPU seconds of this process (all its threads)."""
    result: object


def timed(fn, device) -> Timing:
    synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    synchronize(device)
    return Timing(time.perf_counter() - wall, time.process_time() - cpu, result)


def profile_step(name: str, fn, device, rows: int) -> None:
    """One more step of an update arm under torch.profiler: its top ops by self time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
        synchronize(device)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"\nprofile, {name} (one update step)")
    print(prof.key_averages().table(sort_by=sort, row_limit=rows))


def bench_throughput(args) -> None:
    from flash_rc.learner.distributed import init_world
    from flash_rc.models import resolve_model

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    world = init_world()
    device = world.device
    model_path = resolve_model(args.model)
    ours = build_ours(model_path, world, args.batch, args.micro_batch, args.param_dtype, args.lr)
    optim = ours.settings.actor.optim
    plain = PlainLoop(model_path, world, args.param_dtype, args.lr, optim.betas, optim.weight_decay)
    vocab = ours.policy.causal_lm.config.vocab_size
    sequences = make_batch(args.batch, args.prompt_len, args.response_len, vocab)
    tokens = sum(s.num_tokens for s in sequences)
    responses = sum(len(s.response_token_ids) for s in sequences)
    update_groups = consecutive_groups(args.batch, args.micro_batch)
    no_grad_groups = consecutive_groups(args.batch, 2 * args.micro_batch)
    name = device.type if device.type == "cpu" else torch.cuda.get_device_name(device)
    print(f"{args.model} on {name} ({torch.get_num_threads()} threads), torch {torch.__version__}, "
          f"param dtype {args.param_dtype}; batch {args.batch} sequences = {tokens} tokens ({responses} response), "
          f"micro-batch {args.micro_batch}, temperature {args.temperature}; 1 warm-up + {args.steps} rounds",
          flush=True)

    old = ours.log_probs(sequences, args.temperature)
    sequences = with_old_log_probs(sequences, old)
    arms = {
        "ours: Learner.update": lambda: ours.update(sequences, old, None, args.temperature, args.batch),
        "plain FSDP2 loop": lambda: plain.update(sequences, update_groups, args.temperature),
        "ours: Learner.log_probs (no grad)": lambda: ours.log_probs(sequences, args.temperature),
        "plain forward (no grad)": lambda: plain.log_probs(sequences, no_grad_groups, args.temperature),
    }
    first = {arm: timed(fn, device) for arm, fn in arms.items()}  # warm-up
    print("  warm-up: " + ", ".join(f"{arm} {t.wall:.2f}s" for arm, t in first.items()), flush=True)
    timings: dict[str, list[Timing]] = {arm: [] for arm in arms}
    for round_ in range(args.steps):
        for arm, fn in arms.items():
            timings[arm].append(timed(fn, device))
        print(f"  round {round_ + 1}/{args.steps}: " + ", ".join(f"{t[-1].wall:.2f}s" for t in timings.values()),
              flush=True)  # in the order of the warm-up line

    ours_step, plain_step = first["ours: Learner.update"].result, first["plain FSDP2 loop"].result
    print(f"\nwarm-up step (same weights, same batch): loss ours {ours_step['actor/pg_loss']:+.6f} / plain "
          f"{plain_step['loss']:+.6f}; grad norm ours {ours_step['actor/grad_norm']:.4f} / plain "
          f"{plain_step['grad_norm']:.4f}")
    wall = {arm: [t.wall for t in values] for arm, values in timings.items()}
    cpu = {arm: [t.cpu for t in values] for arm, values in timings.items()}
    print(f"\nlearner throughput, {tokens} tokens per pass (median of {args.steps}; min-max wall seconds; CPU "
          "seconds of this process)")
    print(f"  {'arm':<36} {'wall s':>7} {'min-max':>13} {'tokens/s':>9} {'CPU s':>7} {'tokens/CPU-s':>12}")
    for arm in arms:
        print(f"  {arm:<36} {statistics.median(wall[arm]):>7.2f} {min(wall[arm]):>6.2f}-{max(wall[arm]):<6.2f} "
              f"{tokens / statistics.median(wall[arm]):>9.0f} {statistics.median(cpu[arm]):>7.2f} "
              f"{tokens / statistics.median(cpu[arm]):>12.0f}")
    print()
    for label, ours_arm, plain_arm in (("update", "ours: Learner.update", "plain FSDP2 loop"),
                                       ("no-grad log-probs", "ours: Learner.log_probs (no grad)",
                                        "plain forward (no grad)")):
        by_wall = statistics.median(wall[plain_arm]) / statistics.median(wall[ours_arm])
        by_cpu = statistics.median(cpu[plain_arm]) / statistics.median(cpu[ours_arm])
        met = {True: "met", False: "NOT met"}
        target = (f"  (target >= {TARGET_RATIO}: {met[by_wall >= TARGET_RATIO]} by wall, "
                  f"{met[by_cpu >= TARGET_RATIO]} by CPU time)") if label == "update" else ""
        print(f"  ours / plain tokens/s, {label:<18} wall {by_wall:>5.2f}x, CPU time {by_cpu:>5.2f}x{target}")
    if args.profile:
        profile_step("ours: Learner.update", arms["ours: Learner.update"], device, args.profile)
        profile_step("plain FSDP2 loop", arms["plain FSDP2 loop"], device, args.profile)


# ---------------------------------------------------------------------- part 2: phase shares of a training step


def train_recipe(recipe: Path, steps: int, run_dir: Path, overrides: list[str]) -> Path:
    """Run ``flash-rc train`` on ``recipe`` for ``steps`` steps into ``run_dir`` (its own errors, e.g. a missing data
    file, come back as they are); returns the run directory."""
    settings = [f"trainer.total_training_steps={steps}", f"trainer.default_local_dir={run_dir}",
                "trainer.val_before_train=false", "trainer.test_freq=-1", "trainer.save_freq=-1",
                "data.val_files=null", "trainer.logger=[console]", *overrides]
    command = [str(Path(sys.executable).with_name("flash-rc")), "train", "--config", str(recipe), "--no-progress",
               *settings]
    print(f"running: {' '.join(command)}", flush=True)
    started = time.perf_counter()
    result = subprocess.run(command, check=False, capture_output=True, text=True, env=os.environ)
    if result.returncode:
        raise SystemExit(f"flash-rc train failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
    print(f"  {steps} steps in {time.perf_counter() - started:.0f} s (with start-up and the final checkpoint)",
          flush=True)
    return run_dir


def read_steps(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        raise SystemExit(f"--step-phases {run_dir}: no metrics.jsonl there (give a run directory or a recipe)")
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if r.get("timing_s/step") is not None and not r.get("actor/empty_step")]


def mean(records: list[dict], key: str) -> float:
    values = [r[key] for r in records if r.get(key) is not None]
    return statistics.fmean(values) if values else math.nan


def report_phases(records: list[dict], skip: int, source: str) -> None:
    counted = records[skip:] if len(records) > skip else records
    steps = [int(r["step"]) for r in counted] if all("step" in r for r in counted) else list(range(len(counted)))
    step = mean(counted, "timing_s/step")
    seconds = {phase: mean(counted, f"timing_s/{phase}") for phase in TIMING_PHASES}
    seconds["other"] = step - sum(seconds.values())
    parts = {"generate": mean(counted, "timing_s/generate"), "reward": mean(counted, "timing_s/reward")}
    print(f"\nphase shares of a training step, {source}: mean of steps {steps} "
          f"({len(records) - len(counted)} warm-up step(s) left out)")
    print(f"  {'phase':<26} {'seconds':>8} {'share':>7}")
    for phase, value in seconds.items():
        print(f"  {phase:<26} {value:>8.2f} {value / step:>7.1%}")
        if phase == "rollout":
            for part, part_value in parts.items():
                print(f"    {part:<24} {part_value:>8.2f} {part_value / step:>7.1%}")
    print(f"  {'step':<26} {step:>8.2f} {1:>7.1%}")
    print(f"\n  rollout tokens/s (generated / generate s)            {mean(counted, 'perf/rollout_tokens_per_s'):>8.0f}")
    print(f"  learner tokens/s (prompt + response / update s)      {mean(counted, 'perf/learner_tokens_per_s'):>8.0f}")
    print(f"  tokens per step (prompt + response)                  {mean(counted, 'perf/total_tokens'):>8.0f}")


def bench_step_phases(args) -> None:
    target = Path(args.step_phases)
    if not target.exists():
        raise SystemExit(f"--step-phases {target}: no such run directory or recipe file")
    if target.is_dir():
        report_phases(read_steps(target), args.skip_steps, str(target))
        return
    with tempfile.TemporaryDirectory(prefix="flash_rc_bench_learner.") as work:
        run_dir = train_recipe(target, args.train_steps, Path(work) / "run", args.train_overrides)
        report_phases(read_steps(run_dir), args.skip_steps, f"{target} × {args.train_steps} steps")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--batch", type=int, default=32, help="sequences per update (one mini-batch)")
    parser.add_argument("--prompt-len", type=int, default=32, help="mean prompt tokens (±25%%)")
    parser.add_argument("--response-len", type=int, default=64, help="most response tokens (50-100%%)")
    parser.add_argument("--micro-batch", type=int, default=8, help="sequences per micro-batch")
    parser.add_argument("--steps", type=int, default=3, help="timed rounds after one warm-up")
    parser.add_argument("--param-dtype", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=1e-6)
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (0: torch's default). On a CPU shared with other jobs use 1: with "
                             "more threads than free cores, OpenMP's spinning barriers slow every op down ~10x")
    parser.add_argument("--profile", type=int, default=0, metavar="ROWS",
                        help="also profile one update step of each arm (top ROWS ops by self time)")
    parser.add_argument("--skip-throughput", action="store_true", help="only the phase shares")
    parser.add_argument("--step-phases", metavar="RUN_DIR_OR_RECIPE",
                        help="phase shares of a run directory's metrics.jsonl, or of a short `flash-rc train` run")
    parser.add_argument("--train-steps", type=int, default=4, help="steps of the recipe run")
    parser.add_argument("--skip-steps", type=int, default=1, help="warm-up steps left out of the phase means")
    parser.add_argument("--train-overrides", nargs="*", default=[], metavar="KEY=VALUE",
                        help="more recipe overrides for the recipe run")
    args = parser.parse_args()
    if not args.skip_throughput:
        bench_throughput(args)
    if args.step_phases:
        bench_step_phases(args)


if __name__ == "__main__":
    main()
