"""``flash-rc data ...``: prepare RL parquet files from local datasets (no hub access needed).

    flash-rc data gsm8k    --input-dir ../shared/data/gsm8k --output-dir ~/data/gsm8k
    flash-rc data math     --input dapo-math-17k.parquet --output-dir ~/data/dapo --style dapo --dedup
    flash-rc data math     --input math_train.jsonl --output-dir data/train --style boxed --reasoning360 --name math
    flash-rc data arithmetic --output-dir ~/data/arithmetic --operations add,sub --max-digits 2 --operands 2-3
    flash-rc data validate ~/data/gsm8k/train.parquet

Why a CLI of its own: data prep runs once per dataset on a login node, before any GPU is involved, and its failures
(a malformed row, an unroutable data_source) should stop there with the offending file and row named. Errors are one
line on stderr (``flash_rc.cli.run_command``) with the exit statuses of ``flash_rc.errors``: 0 on success; 1 when the
input data is bad (a malformed row, an unroutable data_source, a file that cannot be read or parsed, a corrupt
parquet file); 2 on bad usage (an unknown option, a missing input file, ``--limit`` below 1, a ``--name`` that is not
a plain file name, arithmetic settings that cannot be met); 3 when an output cannot be written (a path that is a
directory or below a regular file, no permission, disk full).
"""

from __future__ import annotations

import sys
from pathlib import Path

from flash_rc.cli import ArgumentParser, run_command
from flash_rc.data.arithmetic import OPERATORS, ArithmeticConfig, prepare_arithmetic
from flash_rc.data.gsm8k import prepare_gsm8k
from flash_rc.data.math import prepare_math
from flash_rc.data.rows import check_scorer, read_records, validate_row
from flash_rc.errors import ConfigError


def _parser() -> ArgumentParser:
    parser = ArgumentParser(prog="flash-rc data", description="Prepare verl-schema RL parquet files.")
    commands = parser.add_subparsers(dest="command", required=True)

    gsm8k = commands.add_parser("gsm8k", help="GSM8K train/test JSONL -> train.parquet, test.parquet")
    gsm8k.add_argument("--input-dir", type=Path, help="directory holding train.jsonl and test.jsonl")
    gsm8k.add_argument("--train", type=Path, help="train JSONL (overrides --input-dir)")
    gsm8k.add_argument("--test", type=Path, help="test JSONL (overrides --input-dir)")
    gsm8k.add_argument("--output-dir", type=Path, required=True)

    math = commands.add_parser("math", help="DAPO-Math-17k / MATH / AIME-style files -> one parquet")
    math.add_argument("--input", type=Path, action="append", required=True,
                      help=".jsonl/.json/.parquet; repeat to concatenate several files")
    math.add_argument("--output-dir", type=Path, required=True)
    math.add_argument("--split", default="train")
    math.add_argument("--style", choices=("dapo", "boxed"), default="dapo",
                      help="prompt for raw records: DAPO 'Answer:' line (math_dapo scorer) or \\boxed{} (math-verify)")
    math.add_argument("--data-source", help="override data_source (default: math_dapo / lighteval/MATH / math__<name>)")
    math.add_argument("--name", help="output file name without .parquet (default: first input's file stem)")
    math.add_argument("--reasoning360", action="store_true",
                      help="Reasoning360 naming: math__<name>_<size>.parquet and data_source math__<name>")
    math.add_argument("--dedup", action="store_true", help="keep only the first row of each question")
    math.add_argument("--limit", type=int, help="stop after this many rows (at least 1)")

    arithmetic = commands.add_parser("arithmetic", help="generated arithmetic problems -> train.parquet, test.parquet")
    arithmetic.add_argument("--output-dir", type=Path, required=True)
    arithmetic.add_argument("--operations", default="add", help=f"comma-separated, of {','.join(OPERATORS)}")
    arithmetic.add_argument("--min-digits", type=int, default=1, help="digits per operand (1: 0-9, 2: 10-99, ...)")
    arithmetic.add_argument("--max-digits", type=int, default=2)
    arithmetic.add_argument("--operands", type=_operand_count_range, default=(2, 2), help="N or MIN-MAX, at least 2")
    arithmetic.add_argument("--train-size", type=int, default=1000)
    arithmetic.add_argument("--test-size", type=int, default=100)
    arithmetic.add_argument("--seed", type=int, default=0)

    validate = commands.add_parser("validate", help="check parquet files against the row schema and the router")
    validate.add_argument("paths", type=Path, nargs="+")
    return parser


def _operand_count_range(text: str) -> tuple[int, int]:
    """``"2"`` -> (2, 2), ``"2-3"`` -> (2, 3); anything else is a ValueError, which argparse reports as usage."""
    low, dash, high = text.partition("-")
    return int(low), int(high) if dash else int(low)


def _gsm8k(args) -> None:
    train = args.train or (args.input_dir / "train.jsonl" if args.input_dir else None)
    test = args.test or (args.input_dir / "test.jsonl" if args.input_dir else None)
    if train is None or test is None:
        raise ConfigError("give --input-dir, or both --train and --test")
    for split, path in prepare_gsm8k(train, test, args.output_dir).items():
        print(f"wrote {path} ({split})")


def _math(args) -> None:
    path = prepare_math(args.input, args.output_dir, args.split, args.style, args.data_source, args.name,
                        args.reasoning360, args.dedup, args.limit)
    print(f"wrote {path}")


def _arithmetic(args) -> None:
    config = ArithmeticConfig(args.operations, args.min_digits, args.max_digits, *args.operands,
                              args.train_size, args.test_size, args.seed)
    for split, path in prepare_arithmetic(config, args.output_dir).items():
        print(f"wrote {path} ({split})")


def _validate(args) -> None:
    for path in args.paths:
        count = 0
        for where, row in read_records(path):
            validate_row(row, where)
            check_scorer(row, where)
            count += 1
        print(f"{path}: {count} rows OK")


COMMANDS = {"gsm8k": _gsm8k, "math": _math, "arithmetic": _arithmetic, "validate": _validate}


def _run(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    COMMANDS[args.command](args)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command("data", _run, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
