"""Differential check against verl's own scorers (needs verl: ``make test-verl``; skipped elsewhere).

verl's ``gsm8k.py`` and ``math_dapo.py`` are loaded straight from the installed package's files, so the check does not
import verl itself (torch, ray, ...). Inputs: real GSM8K answers and model solutions in three answer formats, plus
random strings built from the characters these scorers care about.
"""

import importlib.util
import json
import random
from pathlib import Path

import pytest

from flash_rc.rewards import gsm8k, math_dapo
from flash_rc.rewards.types import failed_result

pytestmark = pytest.mark.verl
ALPHABET = [*"0123456789.,-$# \n=abcA:{}\\", "####", "#### ", "\\boxed{", "Answer:", "answer: ", "\\frac", "\\text{",
            "sqrt", "\\dfrac12", "dollars", "^\\circ", "\\!", "{,}", "an ", "a "]
GROUND_TRUTHS = ["18", "1000", "-3", "3.5", "\\frac{1}{2}", "72", "1,000", "10\\%", "x=5", "$5$", "\\boxed{4}", "4"]


def verl_scorer(name: str):
    spec = importlib.util.find_spec("verl")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("verl is not installed (run in the verl environment: make test-verl)")
    path = Path(spec.submodule_search_locations[0]) / "utils" / "reward_score" / f"{name}.py"
    module_spec = importlib.util.spec_from_file_location(f"verl_{name}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def texts(gsm8k_dir):
    rng = random.Random(0)
    for line in (gsm8k_dir / "example_model_solutions.jsonl").read_text().splitlines()[:300]:
        solution = json.loads(line)["175b_verification"]["solution"]
        yield from (solution, solution.replace("A: ", "#### "), solution.replace("A: ", "Answer: "))
    for _ in range(20_000):
        length = rng.choice([rng.randint(0, 40), rng.randint(250, 420)])
        yield "".join(rng.choice(ALPHABET) for _ in range(length))


def test_gsm8k_matches_verl(gsm8k_dir):
    reference = verl_scorer("gsm8k")
    rng = random.Random(1)
    for text in texts(gsm8k_dir):
        for method in ("strict", "flexible"):
            assert gsm8k.extract_answer(text, method) == reference.extract_solution(text, method), text
            ground_truth = rng.choice(GROUND_TRUTHS)
            expected = float(reference.compute_score(text, ground_truth, method=method))
            assert gsm8k.compute_score(text, ground_truth, method=method)["score"] == expected, text


def test_math_dapo_matches_verl(gsm8k_dir):
    reference = verl_scorer("math_dapo")
    rng = random.Random(2)
    for text in texts(gsm8k_dir):
        ground_truth = rng.choice(GROUND_TRUTHS + [text[-5:]])
        for strict_box_verify in (False, True):
            expected = reference.compute_score(text, ground_truth, strict_box_verify=strict_box_verify)
            ours = math_dapo.compute_score(text, ground_truth, strict_box_verify=strict_box_verify)
            if not ground_truth.strip():  # deliberate difference: a blank ground truth is missing, not compared
                assert ours == failed_result("no_ground_truth")
                continue
            expected_pred = None if expected["pred"] == "[INVALID]" else expected["pred"]
            assert (ours["score"], ours["acc"], ours["pred"]) == (expected["score"], expected["acc"], expected_pred)
        assert math_dapo.normalize_final_answer(text[-40:]) == reference.normalize_final_answer(text[-40:])
