"""Summary replay buffer: purge, bounds, empty texts, uniform sampling, exact resume, preloading and bad files."""

import json
import re
from collections import Counter
from itertools import combinations

import pytest
from pydantic import ValidationError

from flash_rc.errors import ConfigError, InputNotFoundError, RowError
from flash_rc.rc.replay import ReplayConfig, ReplayEntry, SummaryReplayBuffer


def buffer(seed=0, **config):
    return SummaryReplayBuffer(ReplayConfig(enable=True, **config), seed=seed)


def texts(buf, problem_id):
    return [entry.text for entry in buf.entries(problem_id)]


def order(buf):
    return [record["problem_id"] for record in buf.state_dict()["problems"]]


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def line(problem_id, *entries):
    return json.dumps({"problem_id": problem_id, "entries": [
        {"text": text, "starting_step": depth, "added_at_step": 0} for text, depth in entries]})


def test_config_bounds_and_unknown_keys_are_refused():
    assert ReplayConfig() == ReplayConfig(enable=False, initial_path=None, sample_per_problem=1, purge_on_add=True,
                                          max_entries_per_problem=16, max_problems=None)
    for bad in ({"sample_per_problem": 0}, {"max_entries_per_problem": 0}, {"max_problems": 0}, {"purge": True}):
        with pytest.raises(ValidationError):
            ReplayConfig(**bad)


def test_purge_on_add_keeps_only_the_latest_chain():
    buf = buffer(purge_on_add=True)
    assert buf.add_chain("p", [("a", 1), ("b", 2)], step=1) == 2
    buf.add_chain("p", [("c", 3)], step=2)
    assert buf.entries("p") == [ReplayEntry("c", 3, 2)]


def test_without_purge_chains_accumulate_oldest_first():
    buf = buffer(purge_on_add=False)
    buf.add_chain("p", [("a", 1), ("b", 2)], step=1)
    buf.add_chain("p", [("c", 3)], step=2)
    assert buf.entries("p") == [ReplayEntry("a", 1, 1), ReplayEntry("b", 2, 1), ReplayEntry("c", 3, 2)]


def test_per_problem_bound_keeps_the_newest_entries():
    # no purge, bound 3: a1 a2 then b1 b2 -> the oldest (a1) goes
    buf = buffer(purge_on_add=False, max_entries_per_problem=3)
    buf.add_chain("p", [("a1", 1), ("a2", 2)], step=1)
    buf.add_chain("p", [("b1", 3), ("b2", 4)], step=2)
    assert texts(buf, "p") == ["a2", "b1", "b2"]
    # purge, bound 2: one chain of 4 cycles keeps its last (deepest) two
    buf = buffer(purge_on_add=True, max_entries_per_problem=2)
    buf.add_chain("p", [("s1", 1), ("s2", 2), ("s3", 3), ("s4", 4)], step=1)
    assert texts(buf, "p") == ["s3", "s4"]


def test_problem_bound_evicts_the_least_recently_added():
    buf = buffer(max_problems=2)
    buf.add_chain("p1", [("x", 1)], step=1)
    buf.add_chain("p2", [("x", 1)], step=1)
    buf.add_chain("p1", [("y", 2)], step=2)  # adding refreshes p1: p2 is now the least recently added
    buf.add_chain("p3", [("x", 1)], step=3)
    assert order(buf) == ["p1", "p3"] and "p2" not in buf and len(buf) == 2
    buf.sample("p1")  # sampling does not refresh: p1 is still older than p3
    buf.add_chain("p4", [("x", 1)], step=4)
    assert order(buf) == ["p3", "p4"]
    unbounded = buffer()
    for index in range(50):
        unbounded.add_chain(f"p{index}", [("x", 1)], step=0)
    assert len(unbounded) == 50


def test_empty_texts_are_not_stored_and_an_empty_chain_changes_nothing():
    buf = buffer(purge_on_add=True, max_problems=2)
    assert buf.add_chain("p", [("", 1), ("  \n", 2), ("kept", 3)], step=1) == 1
    assert buf.entries("p") == [ReplayEntry("kept", 3, 1)]
    buf.add_chain("q", [("q1", 1)], step=1)
    # all summaries empty: no purge of p's old entry (RC stored [] and p then yielded zero states), no refresh
    assert buf.add_chain("p", [("", 4), (" ", 5)], step=2) == 0
    assert buf.sample("p") == [ReplayEntry("kept", 3, 1)]
    buf.add_chain("r", [("r1", 1)], step=3)
    assert order(buf) == ["q", "r"]  # p, not refreshed by the empty chain, was the least recently added
    # a new problem whose chain is all empty is not held at all: it starts from scratch
    assert buf.add_chain("new", [("", 1)], step=3) == 0
    assert "new" not in buf and buf.sample("new") == []


def test_sample_is_uniform_without_replacement():
    buf = buffer(seed=3, sample_per_problem=2)
    buf.add_chain("p", [("a", 1), ("b", 2), ("c", 3), ("d", 4)], step=1)
    pairs = Counter()
    for _ in range(6000):
        drawn = [entry.text for entry in buf.sample("p")]
        assert len(drawn) == 2 and drawn[0] != drawn[1]
        pairs[frozenset(drawn)] += 1
    # 6 unordered pairs, 1000 draws each expected; std sqrt(6000 * 1/6 * 5/6) ~ 29, so +-150 is > 5 std
    assert set(pairs) == {frozenset(pair) for pair in combinations("abcd", 2)}
    assert all(850 <= count <= 1150 for count in pairs.values()), pairs
    # fewer entries than sample_per_problem: all of them; an unknown problem: none
    buf.add_chain("small", [("only", 1)], step=1)
    assert buf.sample("small") == [ReplayEntry("only", 1, 1)]
    assert buf.sample("unknown") == []


def draws(buf, problems, count):
    return [[entry.text for entry in buf.sample(problems[index % len(problems)])] for index in range(count)]


def filled(seed):
    buf = buffer(seed=seed, sample_per_problem=2, purge_on_add=False)
    buf.add_chain("p", [(f"p{i}", i + 1) for i in range(6)], step=1)
    buf.add_chain("q", [(f"q{i}", i + 1) for i in range(5)], step=2)
    return buf


def test_sampling_is_determined_by_the_seed():
    assert draws(filled(7), ["p", "q"], 40) == draws(filled(7), ["p", "q"], 40)
    assert draws(filled(7), ["p", "q"], 40) != draws(filled(8), ["p", "q"], 40)


def test_state_dict_round_trip_through_json_resumes_the_same_draws():
    uninterrupted = filled(7)
    draws(uninterrupted, ["p", "q"], 5)
    state = json.loads(json.dumps(uninterrupted.state_dict()))
    expected = draws(uninterrupted, ["p", "q"], 30)
    resumed = buffer(seed=99, sample_per_problem=2, purge_on_add=False)
    resumed.load_state_dict(state)
    assert resumed.entries("p") == uninterrupted.entries("p") and order(resumed) == ["p", "q"]
    assert draws(resumed, ["p", "q"], 30) == expected


def test_save_writes_the_documented_file_and_load_restores_it_exactly(tmp_path):
    buf = buffer(seed=1, max_problems=5)
    buf.add_chain("17", [("s1", 4), ("s2", 5)], step=40)
    buf.add_chain("3", [("t", 1)], step=41)
    draws(buf, ["17"], 3)
    path = buf.save(tmp_path / "replay.jsonl")
    header, *problems = [json.loads(raw) for raw in path.read_text().splitlines()]
    assert header["format"] == "flash_rc.rc.replay" and header["version"] == 1
    assert header["config"]["max_problems"] == 5 and len(header["rng_state"][1]) == 625
    assert problems == [
        {"problem_id": "17", "entries": [{"text": "s1", "starting_step": 4, "added_at_step": 40},
                                         {"text": "s2", "starting_step": 5, "added_at_step": 40}]},
        {"problem_id": "3", "entries": [{"text": "t", "starting_step": 1, "added_at_step": 41}]}]
    expected = draws(buf, ["17", "3"], 20)
    restored = buffer(seed=2, max_problems=5)
    restored.load(path)
    assert restored.state_dict()["problems"] == problems
    assert draws(restored, ["17", "3"], 20) == expected


def test_load_initial_counts_unknown_problems_and_keeps_its_own_rng(tmp_path):
    path = write_lines(tmp_path / "initial.jsonl", [
        line("p1", ("a", 2), ("", 3), ("b", 4)),  # known: 2 non-empty entries
        line("other-dataset", ("z", 1)),          # unknown: counted, not stored
        line("p2", ("", 1)),                      # known, but nothing usable: not loaded
        line("p3", ("c", 7)),                     # known: 1 entry
    ])
    buf = buffer(seed=5)
    assert buf.load_initial(path, ["p1", "p2", "p3", "p4"]) == {"loaded": 2, "unknown_problems": 1, "entries": 3}
    assert texts(buf, "p1") == ["a", "b"] and texts(buf, "p3") == ["c"]
    assert "p2" not in buf and "other-dataset" not in buf
    # a buffer saved by another run preloads too; its header is validated, its RNG state is not taken
    saved = buffer(seed=123)
    saved.add_chain("p1", [("x", 1)], step=9)
    saved.add_chain("gone", [("y", 1)], step=9)
    saved.save(tmp_path / "saved.jsonl")
    fresh, same_seed = buffer(seed=5), buffer(seed=5)
    assert fresh.load_initial(tmp_path / "saved.jsonl", {"p1"}) == {"loaded": 1, "unknown_problems": 1,
                                                                   "entries": 1}
    same_seed.add_chain("p1", [("x", 1)], step=9)
    assert fresh.state_dict()["rng_state"] == same_seed.state_dict()["rng_state"]
    assert fresh.entries("p1") == [ReplayEntry("x", 1, 9)]


@pytest.mark.parametrize(("lines", "message"), [
    ([line("p1", ("a", 1)), line("p2", ("b", 1)), '{"problem_id": "p3", "entries": [}'], ":3: invalid JSON"),
    ([line("p1", ("a", 1)), json.dumps({"problem_id": "p2", "entries": [
        {"text": "b", "starting_step": "3", "added_at_step": 0}]})],
     ":2: field 'entries[0].starting_step' must be an int >= 0, got '3'"),
    ([line("p1", ("a", -1))], ":1: field 'entries[0].starting_step' must be an int >= 0, got -1"),
    (['{"problem_id": "p1", "entries": [{"text": "a", "starting_step": true, "added_at_step": 0}]}'],
     ":1: field 'entries[0].starting_step' must be an int >= 0, got True"),
    (['{"problem_id": "p1", "entries": [{"text": 5, "starting_step": 1, "added_at_step": 0}]}'],
     ":1: field 'entries[0].text' must be a string, got 5"),
    (['{"problem_id": 7, "entries": []}'], ":1: field 'problem_id' must be a non-empty string, got 7"),
    (['{"problem_id": "p1", "entries": "a"}'], ":1: field 'entries' must be a list, got 'a'"),
    ([line("p1", ("a", 1)), line("p1", ("b", 2))], ":2: problem_id 'p1' already appears at"),
    (['{"format": "flash_rc.rc.replay", "version": 2}', line("p1", ("a", 1))],
     ":1: unsupported replay buffer version 2 (expected 1)"),
])
def test_a_corrupt_initial_file_names_the_line_and_field(tmp_path, lines, message):
    path = write_lines(tmp_path / "initial.jsonl", lines)
    buf = buffer()
    with pytest.raises(RowError, match="^" + re.escape(f"{path}{message}")):
        buf.load_initial(path, {"p1", "p2", "p3"})
    assert len(buf) == 0  # nothing is stored from a file that fails


def test_load_needs_the_header_and_a_valid_rng_state(tmp_path):
    headerless = write_lines(tmp_path / "headerless.jsonl", [line("p1", ("a", 1))])
    with pytest.raises(RowError, match=r"headerless.jsonl:1: not a replay buffer header"):
        buffer().load(headerless)
    bad_rng = write_lines(tmp_path / "bad_rng.jsonl", [json.dumps(
        {"format": "flash_rc.rc.replay", "version": 1, "rng_state": [3, [1, 2], None]})])
    with pytest.raises(RowError, match=r"bad_rng.jsonl:1: field 'rng_state' is not a random.Random state"):
        buffer().load(bad_rng)
    with pytest.raises(RowError, match=r"empty.jsonl: empty"):
        buffer().load(write_lines(tmp_path / "empty.jsonl", []))
    state = buffer().state_dict()
    state["problems"] = [{"problem_id": "p", "entries": [{"text": "a", "starting_step": -2, "added_at_step": 0}]}]
    with pytest.raises(RowError, match=r"problems\[0\]: field 'entries\[0\].starting_step' must be an int >= 0"):
        buffer().load_state_dict(state)


def test_missing_file_and_wrong_suffix(tmp_path):
    with pytest.raises(InputNotFoundError, match="missing.jsonl"):
        buffer().load_initial(tmp_path / "missing.jsonl", set())
    with pytest.raises(InputNotFoundError, match="missing.jsonl"):
        buffer().load(tmp_path / "missing.jsonl")
    with pytest.raises(ConfigError, match=r"must be .jsonl, got .*buffer.json$"):
        buffer().save(tmp_path / "buffer.json")


def test_metrics_and_depth_histogram():
    empty = buffer().metrics()
    assert len(empty) == 13 and set(empty.values()) == {0.0}  # 4 scalars + depth_0..depth_7 + depth_8plus
    buf = buffer(purge_on_add=False)
    buf.add_chain("p1", [("a", 1), ("b", 2), ("c", 3)], step=1)
    buf.add_chain("p2", [("d", 9), ("e", 12)], step=1)
    buf.add_chain("p2", [("f", 8)], step=2)
    metrics = buf.metrics()
    # depths 1, 2, 3, 9, 12, 8: mean 35 / 6, max 12; 9, 12 and 8 fall into the 8plus bucket
    assert metrics == pytest.approx({
        "rc/buffer/problems": 2, "rc/buffer/entries": 6, "rc/buffer/depth_mean": 35 / 6, "rc/buffer/depth_max": 12,
        "rc/buffer/depth_0": 0, "rc/buffer/depth_1": 1, "rc/buffer/depth_2": 1, "rc/buffer/depth_3": 1,
        "rc/buffer/depth_4": 0, "rc/buffer/depth_5": 0, "rc/buffer/depth_6": 0, "rc/buffer/depth_7": 0,
        "rc/buffer/depth_8plus": 3})
