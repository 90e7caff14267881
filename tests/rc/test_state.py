"""Chain state: counters, metadata, summary modes and think-tag handling."""

import json
from types import SimpleNamespace

from flash_rc.rc.state import ChainState, clean_summary, reasoning_for_summary


def completion(text, version=0, start=None):
    return SimpleNamespace(text=text, token_ids=[1, 2], logprobs=[-0.5, -0.25], prompt_token_ids=[9],
                           finish_reason="stop", model_version=version,
                           model_version_start=version if start is None else start)


def run_cycles(chain, cycles):
    for c in range(cycles):
        chain.record_turn("reasoning", f"R{c}", completion(f"reasoning {c}", version=c))
        chain.record_turn("summarization", f"S{c}", completion(f"summary {c}", version=c))


def test_counters_and_metadata_follow_the_rc_table():
    chain = ChainState(problem_id="p7", sample_id=3, problem="x")
    run_cycles(chain, 3)
    # cycle_step 0..5 alternate reasoning/summarization, turn_number counts within a type
    table = [(t.cycle_step, t.turn_type, t.turn_number) for t in chain.turns]
    assert table == [(0, "reasoning", 1), (1, "summarization", 1), (2, "reasoning", 2),
                     (3, "summarization", 2), (4, "reasoning", 3), (5, "summarization", 3)]
    assert (chain.reasoning_turn_number, chain.summarization_turn_number, chain.overall_cycle_step) == (3, 3, 6)
    meta = chain.turn_metadata(chain.turns[4])
    assert meta == {"problem_id": "p7", "sample_id": 3, "cycle_step": 4, "turn_type": "reasoning",
                    "turn_number": 3, "model_version": 2}


def test_model_version_is_per_turn_not_per_chain():
    chain = ChainState(problem_id="p", sample_id=0, problem="x")
    chain.record_turn("reasoning", "R", completion("a", version=0))
    chain.record_turn("summarization", "S", completion("b", version=4, start=3))
    assert [t.model_version for t in chain.turns] == [0, 4]
    assert chain.turns[1].model_version_start == 3


def test_replace_and_append_summaries():
    replace = ChainState(problem_id="p", sample_id=0, problem="x")
    append = ChainState(problem_id="p", sample_id=0, problem="x")
    run_cycles(replace, 2)
    for c in range(2):
        append.record_turn("reasoning", f"R{c}", completion(f"reasoning {c}"), summary_mode="append")
        append.record_turn("summarization", f"S{c}", completion(f"summary {c}"), summary_mode="append")
    assert replace.curr_summary == "summary 1"
    assert append.curr_summary == "summary 0\n\nsummary 1"
    # the next summarization prompt sees the current summary and the latest reasoning
    assert replace.prompt_values("summarization") == {"problem": "x", "existing_summary": "summary 1",
                                                      "reasoning": "reasoning 1"}


def test_think_tags():
    # only the thinking before </think> goes to the summarizer
    assert reasoning_for_summary("<think>I add 2 and 2</think> The answer is \\boxed{4}", True) == "I add 2 and 2"
    assert reasoning_for_summary("<think>cut off mid-thought", True) == "cut off mid-thought"
    assert reasoning_for_summary("plain </think> text", False) == "plain </think> text"
    # a summarizer that thinks first: keep what follows </think>
    assert clean_summary("<think>draft</think>\nI computed 4.") == "I computed 4."
    assert clean_summary("I computed 4.") == "I computed 4."
    chain = ChainState(problem_id="p", sample_id=0, problem="x")
    turn = chain.record_turn("reasoning", "R", completion("<think>work</think>answer"), use_think_tags=True)
    assert (turn.raw_text, turn.text, chain.curr_reasoning) == ("<think>work</think>answer", "work", "work")


def test_record_is_json_serialisable():
    chain = ChainState(problem_id="p", sample_id=1, problem="x", ground_truth="4")
    run_cycles(chain, 1)
    record = json.loads(json.dumps(chain.to_record()))
    assert record["turns"][1]["metadata"]["turn_type"] == "summarization"
    assert record["turns"][0]["logprobs"] == [-0.5, -0.25]
