"""GSM8K scorer: verl's strict/flexible semantics on hand-worked strings and on real model solutions."""

import json

import pytest

from flash_rc.rewards.gsm8k import compute_score, extract_answer

MODELS = ("6b_finetuning", "6b_verification", "175b_finetuning", "175b_verification")


@pytest.mark.parametrize("text, method, expected", [
    # strict: the last "#### <number>", commas removed
    ("She makes 9 * 2 = $18 a day.\n#### 18", "strict", "18"),
    ("#### 1,234", "strict", "1234"),
    ("#### -3.5", "strict", "-3.5"),
    ("first #### 1 then #### 2", "strict", "2"),
    ("####18", "strict", None),  # the space after #### is required
    ("#### $18", "strict", None),  # "$" is not part of the number pattern, so nothing matches
    ("The answer is 18", "strict", None),
    # flexible: the last number-like token that is not ".", commas kept
    ("The answer is 18.", "flexible", "18."),  # "18." is one token: digits and dots
    ("18 apples, then 1,000 pears", "flexible", "1,000"),
    ("costs 5 dollars. Done.", "flexible", "5"),  # trailing "." tokens are skipped
    ("Only dots . . .", "flexible", "."),  # every token is ".": verl returns that "."
    ("no digits here", "flexible", None),
    ("", "strict", None),
    ("", "flexible", None),
])
def test_extract_answer_follows_verl(text, method, expected):
    assert extract_answer(text, method) == expected


def test_only_last_300_characters_are_searched():
    answer = "#### 42"  # 7 characters
    assert extract_answer(answer + " " * 293, "strict") == "42"  # 300 characters: all inside the window
    assert extract_answer(answer + " " * 294, "strict") is None  # 301: the window starts at "### 42", no "#### "
    assert extract_answer(answer + " " * 294, "flexible") == "42"  # flexible needs no prefix


def test_scores_match_verl_rules():
    assert compute_score("#### 72", "72") == {"score": 1.0, "acc": True, "pred": "72", "reason": "correct"}
    assert compute_score("#### 71", "72") == {"score": 0.0, "acc": False, "pred": "71", "reason": "wrong_answer"}
    assert compute_score("no answer", "72") == {"score": 0.0, "acc": False, "pred": None, "reason": "no_answer"}
    # format_score is paid for a found-but-wrong answer only; "no answer" stays 0 (verl returns 0 there).
    assert compute_score("#### 71", "72", format_score=0.1)["score"] == 0.1
    assert compute_score("nothing", "72", format_score=0.1)["score"] == 0.0
    assert compute_score("#### 72", "72", score=2.0)["score"] == 2.0
    # exact string comparison: "72.0" is not "72"
    assert compute_score("#### 72.0", "72")["acc"] is False
    # a non-string ground truth is compared as str() (verl's equality would never match it)
    assert compute_score("#### 72", 72)["acc"] is True


def test_unknown_method_is_an_error():
    with pytest.raises(ValueError, match="strict' or 'flexible"):
        extract_answer("#### 1", "fuzzy")


def _model_solutions(gsm8k_dir):
    for line in (gsm8k_dir / "example_model_solutions.jsonl").read_text().splitlines():
        row = json.loads(line)
        ground_truth = row["ground_truth"].rsplit("A: ", 1)[1].strip().replace(",", "")
        for model in MODELS:
            yield row[model]["solution"], row[model]["is_correct"], ground_truth


def test_real_model_solutions_agree_with_their_correctness_labels(gsm8k_dir):
    """5,276 real GPT-3 solutions end in "A: <n>"; rewritten to "#### <n>" the strict scorer must reproduce the
    dataset authors' is_correct labels, except where the label uses numeric equality ("18.00" vs "18")."""
    disagreements, total = [], 0
    for solution, is_correct, ground_truth in _model_solutions(gsm8k_dir):
        result = compute_score(solution.replace("A: ", "#### "), ground_truth)
        total += 1
        if result["acc"] != is_correct:
            disagreements.append((result["pred"], ground_truth, is_correct))
    assert total == 5276
    for pred, ground_truth, is_correct in disagreements:
        # every disagreement is a numerically-equal answer in another spelling, which exact matching rejects
        assert is_correct and pred is not None and float(pred) == float(ground_truth), (pred, ground_truth)
    assert len(disagreements) < 0.01 * total


def test_flexible_reads_the_final_a_line_of_real_solutions(gsm8k_dir):
    # "A: 18" ends every solution, so the last number is the model's answer and flexible scoring matches strict.
    for solution, _, ground_truth in list(_model_solutions(gsm8k_dir))[:400]:
        strict = compute_score(solution.replace("A: ", "#### "), ground_truth)
        assert compute_score(solution, ground_truth, method="flexible")["acc"] == strict["acc"]


def test_every_gold_answer_scores_one(gsm8k_dir):
    for line in (gsm8k_dir / "test.jsonl").read_text().splitlines():
        answer = json.loads(line)["answer"]
        ground_truth = answer.rsplit("#### ", 1)[1].replace(",", "")
        assert compute_score(answer, ground_truth)["score"] == 1.0


@pytest.mark.parametrize("text, expected_pred", [
    ("#### " + "9" * 5000, None),  # 5,000 digits: the 300-char window holds only digits, so no "#### " is seen
    ("x" * 1_000_000 + "\n#### 12", "12"),  # a 1 MB response costs one slice of 300 chars
    ("#### " + "1" * 250, "1" * 250),  # a huge number that fits the window is returned verbatim, never parsed
    ("\ufffd\ufffd #### 7", "7"),  # replacement characters from undecodable bytes are just text
    ("\ud800 #### 7", "7"),  # a lone surrogate (from surrogateescape decoding) does not break the regex
])
def test_adversarial_inputs(text, expected_pred):
    assert compute_score(text, "7")["pred"] == expected_pred
