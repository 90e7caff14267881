"""Per-turn scoring of Reasoning-Cache chains."""

import pytest

from flash_rc.rc.grading import CycleAccuracy, RcChain, score_rc_chain, score_rc_chains
from flash_rc.rc.state import ChainState, Turn


def test_each_turn_is_scored_on_its_own_answer():
    turns = ["First pass: 3 + 4 = 8.\n#### 8",  # wrong
             "Summary said 8; rechecking: 3 + 4 = 7.\n#### 7",  # fixed by the second cycle
             "I lost track."]  # no final answer
    results = score_rc_chain(turns, "7", "openai/gsm8k")
    assert [(r["score"], r["reason"]) for r in results] == [(0.0, "wrong_answer"), (1.0, "correct"), (0.0, "no_answer")]


def test_many_chains_in_one_batch_keep_their_shape():
    chains = [
        RcChain(["Answer: 1", "Answer: 2"], "2", "math_dapo"),
        RcChain(["\\boxed{0.5}"], "\\frac{1}{2}", "lighteval/MATH"),
        RcChain(["#### 5", "#### 5", "#### 6"], "5", "openai/gsm8k"),
    ]
    results = score_rc_chains(chains)
    assert [[r["score"] for r in chain] for chain in results] == [[-1.0, 1.0], [1.0], [1.0, 1.0, 0.0]]


def test_scorer_kwargs_apply_to_every_turn():
    results = score_rc_chain(["it is 7", "it is 8"], "7", "openai/gsm8k", method="flexible")
    assert [r["acc"] for r in results] == [True, False]


@pytest.mark.parametrize("turns", [[], "#### 7"])
def test_rejects_chains_without_turns(turns):
    with pytest.raises(ValueError, match="RC chain 1 must hold a non-empty sequence of turn texts"):
        score_rc_chains([RcChain(["#### 7"], "7", "openai/gsm8k"), RcChain(turns, "7", "openai/gsm8k")])


def test_accuracy_per_cycle_counts_missing_turns_as_wrong():
    def chain(*correct):
        c = ChainState(problem_id="p", sample_id=0, problem="x")
        for number, ok in enumerate(correct, 1):
            c.turns.append(Turn("reasoning", number, 2 * (number - 1), "", [], "", "", [], [], "stop", 0, 0,
                                correct=ok))
        return c

    # cycle 1: 2 of 4 right; cycle 2: 1 of 4 (the third chain failed after cycle 1, the fourth never started)
    accuracy = CycleAccuracy(2)
    for c in [chain(True, True), chain(True, False), chain(False), chain()]:
        accuracy.add(c)
    assert accuracy.per_cycle() == [0.5, 0.25]
    assert CycleAccuracy(3).per_cycle() == [0.0, 0.0, 0.0]
