"""``flash-rc data ...``: prepare RL parquet files from local datasets (no hub access needed).

    flash-rc data gsm8k    --input-dir ../shared/data/gsm8k --output-dir ~/data/gsm8k
    flash-rc data math     --input dapo-math-17k.parquet --output-dir ~/data/dapo --style dapo --dedup
    flash-rc data math     --input math_train.jsonl --output-dir data/train --style boxed --reasoning360 --name math
    flash-rc data validate ~/data/gsm8k/train.parquet

Why a CLI of its own: data prep runs once per dataset on a login node, before any GPU is involved, and its failures
(a malformed row, an unroutable data_source) should stop there with the offending file and row named. Exit status:
0 on success, 1 on bad data, 2 on bad usage.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from flash_rc.data.gsm8k import prepare_gsm8k
from flash_rc.data.math import prepare_math
from flash_rc.data.rows import RowError, read_records, validate_row
from flash_rc.rewards.router import UnknownDataSourceError, resolve_route


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flash-rc data", description="Prepare verl-schema RL parquet files.")
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
    math.add_argument("--name", help="output name (default: first input's file stem)")
    math.add_argument("--reasoning360", action="store_true",
                      help="Reasoning360 naming: math__<name>_<size>.parquet and data_source math__<name>")
    math.add_argument("--dedup", action="store_true", help="keep only the first row of each question")
    math.add_argument("--limit", type=int, help="stop after this many rows")

    validate = commands.add_parser("validate", help="check parquet files against the row schema and the router")
    validate.add_argument("paths", type=Path, nargs="+")
    return parser


def _validate(paths: list[Path]) -> None:
    for path in paths:
        count = 0
        for where, row in read_records(path):
            validate_row(row, where)
            try:
                resolve_route(row["data_source"], row["extra_info"])
            except UnknownDataSourceError as exc:
                raise RowError(f"{where}: {exc}") from None
            count += 1
        print(f"{path}: {count} rows OK")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "gsm8k":
            train = args.train or (args.input_dir / "train.jsonl" if args.input_dir else None)
            test = args.test or (args.input_dir / "test.jsonl" if args.input_dir else None)
            if train is None or test is None:
                print("error: give --input-dir, or both --train and --test", file=sys.stderr)
                return 2
            for split, path in prepare_gsm8k(train, test, args.output_dir).items():
                print(f"wrote {path} ({split})")
        elif args.command == "math":
            path = prepare_math(args.input, args.output_dir, args.split, args.style, args.data_source, args.name,
                                args.reasoning360, args.dedup, args.limit)
            print(f"wrote {path}")
        else:
            _validate(args.paths)
    except (RowError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:  # bad names, styles
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
