"""A built-in, learnable task: short arithmetic problems (``23 + 45``) as verl parquet rows, no dataset needed.

Why: a small model learns nothing from GRPO on a task it never solves (every group scores 0). SmolLM2-135M-Instruct
solves ~0-3% of GSM8K but ~70% of single-digit and 10-18% of two-digit additions, so this task's difficulty (digits
per operand, operand count, operations) can be set where groups disagree and the reward can rise. Each row::

    data_source  "arithmetic"                       (scored by ``flash_rc.rewards.arithmetic``)
    prompt       [{"role": "user", "content": question + " " + INSTRUCTION}]
    ability      "math"
    reward_model {"style": "rule", "ground_truth": the integer answer, e.g. "68" or "-12"}
    extra_info   {"split", "index", "answer", "question", "expression": canonical "23 + 45"}

Problems are drawn uniformly from every distinct expression of the settings (an expression is its operands and
operators in order, so ``23 + 45`` and ``45 + 23`` are two; with ``min_digits=1, max_digits=2`` most operands
therefore have two digits). Each expression appears at most once in all: the first ``test_size`` drawn form the test
split and the next ``train_size`` the train split, so the splits never overlap. The answer follows the usual
precedence (``*`` before ``+`` and ``-``, else left to right) and may be negative. The same seed and settings give the
same rows; settings that cannot be met (more problems than distinct expressions exist, digits below 1, fewer than
two operands, an unknown operation) raise ``ConfigError`` naming the setting before anything is drawn.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from flash_rc.data.rows import make_row, write_parquet_atomic
from flash_rc.errors import ConfigError

DATA_SOURCE = "arithmetic"
INSTRUCTION = "Put your final answer in \\boxed{}."
OPERATORS = {"add": "+", "sub": "-", "mul": "*"}
PHRASINGS = ("What is {expression}?", "Calculate {expression}.", "Compute {expression}.",
             "What is the value of {expression}?", "Evaluate {expression}.")
MAX_DIGITS = 18
MAX_OPERANDS = 10
MAX_PROBLEMS = 1_000_000
DENSE_FRACTION = 0.5
"""When the problems asked for are at least this share of every distinct expression, all of them are shuffled instead
of drawn one by one (drawing and skipping repeats would slow down near the end, like collecting coupons)."""


@dataclass(frozen=True)
class ArithmeticConfig:
    operations: tuple[str, ...] = ("add",)
    min_digits: int = 1
    max_digits: int = 2
    min_operands: int = 2
    max_operands: int = 2
    train_size: int = 1000
    test_size: int = 100
    seed: int = 0

    def __post_init__(self):
        operations = (self.operations.split(",") if isinstance(self.operations, str) else list(self.operations))
        operations = [operation.strip() for operation in operations]
        unknown = [operation for operation in operations if operation not in OPERATORS]
        if not operations or unknown:
            raise ConfigError(f"operations must be a non-empty list of {sorted(OPERATORS)}, got {operations}")
        object.__setattr__(self, "operations", tuple(dict.fromkeys(operations)))  # order kept, repeats dropped
        for name, low, high in (("min_digits", 1, MAX_DIGITS), ("max_digits", "min_digits", MAX_DIGITS),
                                ("min_operands", 2, MAX_OPERANDS), ("max_operands", "min_operands", MAX_OPERANDS),
                                ("train_size", 1, MAX_PROBLEMS), ("test_size", 1, MAX_PROBLEMS)):
            self._check_int(name, low, high)
        self._check_int("seed")
        total = self.num_expressions
        if self.train_size + self.test_size > total:
            raise ConfigError(
                f"train_size + test_size = {self.train_size + self.test_size} asks for more problems than the "
                f"{total} distinct expressions of {self.describe()}; lower the sizes or widen the settings")

    def _check_int(self, name: str, low: int | str | None = None, high: int | None = None) -> None:
        """``low`` may name an earlier setting (``max_digits`` must be at least ``min_digits``)."""
        value = getattr(self, name)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name} must be a whole number, got {value!r}")
        bound = getattr(self, low) if isinstance(low, str) else low
        if (bound is not None and value < bound) or (high is not None and value > high):
            shown = f"{low} ({bound})" if isinstance(low, str) else low
            raise ConfigError(f"{name} must be between {shown} and {high}, got {value}")

    @property
    def operand_values(self) -> range:
        """Every operand value: 0-9 for one digit, 10^(d-1) .. 10^d - 1 for d > 1 digits."""
        low = 0 if self.min_digits == 1 else 10 ** (self.min_digits - 1)
        return range(low, 10 ** self.max_digits)

    def _block_size(self, operands: int) -> int:
        return len(self.operand_values) ** operands * len(self.operations) ** (operands - 1)

    @property
    def num_expressions(self) -> int:
        """How many distinct expressions (operands and operators in order) these settings allow."""
        return sum(self._block_size(k) for k in range(self.min_operands, self.max_operands + 1))

    def describe(self) -> str:
        digits = _span(self.min_digits, self.max_digits)
        operands = _span(self.min_operands, self.max_operands)
        return f"{digits}-digit {operands}-operand {'/'.join(self.operations)} problems"

    def expression(self, number: int) -> tuple[list[int], list[str]]:
        """The ``number``-th distinct expression (0 <= number < num_expressions) as (operands, operator symbols)."""
        values = self.operand_values
        for operands in range(self.min_operands, self.max_operands + 1):
            block = self._block_size(operands)
            if number < block:
                break
            number -= block
        numbers = []
        for _ in range(operands):
            number, digit = divmod(number, len(values))
            numbers.append(values[digit])
        symbols = []
        for _ in range(operands - 1):
            number, choice = divmod(number, len(self.operations))
            symbols.append(OPERATORS[self.operations[choice]])
        return numbers, symbols




def _span(low: int, high: int) -> str:
    return str(low) if low == high else f"{low}-{high}"


def evaluate(operands: Sequence[int], symbols: Sequence[str]) -> int:
    """The value of ``operands[0] symbols[0] operands[1] ...`` with ``*`` before ``+``/``-`` (no ``eval``)."""
    total, sign, term = 0, 1, operands[0]
    for symbol, value in zip(symbols, operands[1:]):
        if symbol == "*":
            term *= value
            continue
        total += sign * term
        sign, term = (1 if symbol == "+" else -1), value
    return total + sign * term


def canonical(operands: Sequence[int], symbols: Sequence[str]) -> str:
    """``"23 + 45 * 6"``: the expression as it is shown and deduplicated."""
    parts = [str(operands[0])]
    for symbol, value in zip(symbols, operands[1:]):
        parts += [symbol, str(value)]
    return " ".join(parts)


def _draw_numbers(config: ArithmeticConfig, count: int, rng: random.Random) -> list[int]:
    """``count`` distinct expression numbers in random order."""
    total = config.num_expressions
    if count >= DENSE_FRACTION * total:  # total <= 2 * count here, so the whole list is small
        numbers = list(range(total))
        rng.shuffle(numbers)
        return numbers[:count]
    drawn: dict[int, None] = {}
    while len(drawn) < count:  # at most half are taken, so a repeat is drawn at most half the time
        drawn.setdefault(rng.randrange(total))
    return list(drawn)


def arithmetic_rows(config: ArithmeticConfig) -> dict[str, list[dict]]:
    """``{"train": rows, "test": rows}`` for ``config``, the same for the same config."""
    rng = random.Random(config.seed)
    numbers = _draw_numbers(config, config.test_size + config.train_size, rng)
    rows: dict[str, list[dict]] = {"test": [], "train": []}
    for position, number in enumerate(numbers):
        split = "test" if position < config.test_size else "train"
        operands, symbols = config.expression(number)
        expression = canonical(operands, symbols)
        question = rng.choice(PHRASINGS).format(expression=expression)
        answer = str(evaluate(operands, symbols))
        rows[split].append(make_row(DATA_SOURCE, f"{question} {INSTRUCTION}", "math", answer, split,
                                    len(rows[split]), answer, question, {"expression": expression}))
    return {"train": rows["train"], "test": rows["test"]}


def prepare_arithmetic(config: ArithmeticConfig, output_dir: str | Path) -> dict[str, Path]:
    """Write ``train.parquet`` and ``test.parquet`` under ``output_dir``."""
    return {split: write_parquet_atomic(split_rows, Path(output_dir) / f"{split}.parquet")
            for split, split_rows in arithmetic_rows(config).items()}
