"""``flash-rc eval CKPTS...``: evaluate a run's checkpoints on GSM8K test with one rollout engine, resumably.

``CKPTS`` are globs (quote them: ``'runs/x/global_step_*'``), checkpoint folders or run directories
(``flash_rc.eval.discovery``). Results go to ``--output`` (default ``<the checkpoints' common parent>/eval``):
``gsm8k.csv``, ``generations/*.jsonl``, ``gsm8k.png`` and ``report.html`` (``flash_rc.eval.sweep``). Everything the
user can get wrong (no checkpoint matched, a bad data row, a results table with another header, bad flags) is one
error line and a non-zero exit before the engine starts; existing rows are never touched.
"""

from __future__ import annotations

from pathlib import Path

from flash_rc.eval.discovery import common_parent, discover
from flash_rc.eval.sweep import DEFAULT_DATA, SweepSettings, format_summary, run_sweep

from flash_rc.errors import ConfigError


def settings_from_args(args) -> SweepSettings:
    """The sweep settings the flags describe; contradictory flags are a ConfigError."""
    if args.mode == "single" and args.cycles not in (None, 1):
        raise ConfigError(f"--cycles {args.cycles} needs --mode rc (single mode has one cycle)")
    temperature = args.temperature if args.temperature is not None else (0.0 if args.n == 1 else 1.0)
    if args.n > 1 and temperature == 0:
        raise ConfigError(f"--n {args.n} greedy samples are all the same answer; set --temperature > 0")
    values = {"data": args.data, "limit": args.limit, "n": args.n, "k": args.k or args.n, "temperature": temperature,
              "top_p": args.top_p, "max_tokens": args.max_tokens, "max_summary_tokens": args.max_summary_tokens,
              "mode": args.mode, "cycles": args.cycles or (2 if args.mode == "rc" else 1),
              "precision": args.precision, "seed": args.seed, "engine": tuple(args.engine)}
    return SweepSettings(**values)


def main(argv: list[str]) -> int:
    from flash_rc.cli import ArgumentParser

    parser = ArgumentParser(prog="flash-rc eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoints", nargs="+", metavar="CKPTS", help="globs, checkpoint folders or run directories")
    parser.add_argument("--data", default=DEFAULT_DATA, help=f"problem file, JSONL or verl parquet ({DEFAULT_DATA})")
    parser.add_argument("--output", help="sweep directory (default: <common parent of the checkpoints>/eval)")
    parser.add_argument("--precision", default="bf16", choices=["bf16", "int8", "fp8"], help="rollout weights")
    parser.add_argument("--mode", default="single", choices=["single", "rc"], help="one answer, or RC cycles")
    parser.add_argument("--cycles", type=int, help="RC mode: T_test reasoning turns per chain (default 2)")
    parser.add_argument("--n", type=int, default=1, help="samples per problem (default 1: greedy)")
    parser.add_argument("--k", type=int, help="k of pass@k (default: n)")
    parser.add_argument("--temperature", type=float, help="default 0 (greedy) for n=1, else 1.0")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--max-tokens", type=int, default=1024, help="answer / reasoning-turn budget")
    parser.add_argument("--max-summary-tokens", type=int, default=512, help="RC mode: summary budget")
    parser.add_argument("--limit", type=int, default=-1, help="only the first N problems (-1: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--engine", action="append", default=[], metavar="KEY=VALUE",
                        help="an EngineConfig setting, e.g. kv_cache_gib=0.5 (repeatable)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_intermixed_args(argv)
    try:
        settings = settings_from_args(args)
    except ValueError as error:  # pydantic's ValidationError: a flag out of bounds
        if isinstance(error, ConfigError):
            raise
        problems = "; ".join(f"--{'-'.join(str(e['loc'][0]).split('_'))}: {e['msg']}" for e in error.errors())
        raise ConfigError(f"invalid flags: {problems}") from None
    output = Path(args.output).expanduser() if args.output else None
    checkpoints = discover(args.checkpoints, exclude=[output] if output else [])
    if output is None:
        output = common_parent(checkpoints) / "eval"
        checkpoints = [c for c in checkpoints if c.path != output.resolve()]
    summary = run_sweep(checkpoints, settings, output, progress=not args.no_progress)
    print(format_summary(summary))
    return 0
