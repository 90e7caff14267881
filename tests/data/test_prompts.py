"""Training prompts: real files (parquet, JSONL, raw GSM8K) through the tiny model's real tokenizer, verl's overlong
rules and errors, and the sampler's order (verl's, epoch by epoch) surviving a resume."""

import json

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, RandomSampler

from flash_rc.chat import prompt_token_ids
from flash_rc.data.arithmetic import ArithmeticConfig, arithmetic_rows
from flash_rc.data.gsm8k import INSTRUCTION
from flash_rc.data.prompts import PromptSampler, load_train_prompts
from flash_rc.data.rows import write_parquet_atomic
from flash_rc.errors import ConfigError, InputNotFoundError, RowError

# tokens of the first 8 GSM8K train prompts (question + INSTRUCTION, chat template, generation prompt) with the tiny
# tokenizer: 65, 57, 187, 154, 91, 189, 179, 309
GSM8K_HEAD_LENGTHS = [65, 57, 187, 154, 91, 189, 179, 309]


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.fixture()
def gsm8k_head(gsm8k_dir, tmp_path):
    """The first 8 lines of the real GSM8K train split, as a raw JSONL file."""
    with open(gsm8k_dir / "train.jsonl") as f:
        lines = [next(f) for _ in range(8)]
    path = tmp_path / "gsm8k_head.jsonl"
    path.write_text("".join(lines))
    return path


@pytest.fixture(scope="module")
def arithmetic_train():
    return arithmetic_rows(ArithmeticConfig(train_size=20, test_size=5, seed=3))["train"]


@pytest.fixture()
def arithmetic_parquet(arithmetic_train, tmp_path):
    return write_parquet_atomic(arithmetic_train, tmp_path / "train.parquet")


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def load(files, tokenizer, max_prompt_length=1024, filter_overlong_prompts=False, **kwargs):
    return load_train_prompts(files if isinstance(files, list) else str(files), tokenizer, max_prompt_length,
                              filter_overlong_prompts, **kwargs)


def test_parquet_rows_become_chat_templated_token_ids(arithmetic_parquet, arithmetic_train, tokenizer):
    prompt_set = load(arithmetic_parquet, tokenizer)
    assert (len(prompt_set), prompt_set.rows_read, prompt_set.overlong_dropped) == (20, 20, 0)
    first, row = prompt_set.prompts[0], arithmetic_train[0]
    assert first.uid == "train/0" and [p.uid for p in prompt_set.prompts][-1] == "train/19"
    assert (first.data_source, first.ground_truth) == ("arithmetic", row["reward_model"]["ground_truth"])
    assert first.extra_info["expression"] == row["extra_info"]["expression"] and first.messages == row["prompt"]
    assert list(first.prompt_token_ids) == prompt_token_ids(tokenizer, row["prompt"])
    # ChatML: the user turn, then the assistant's opening the model continues from
    content = row["prompt"][0]["content"]
    assert tokenizer.decode(first.prompt_token_ids) == f"<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n"


def test_jsonl_verl_rows_match_parquet_and_keep_what_the_row_holds(arithmetic_parquet, arithmetic_train, tokenizer,
                                                                   tmp_path):
    from_jsonl = load(write_jsonl(tmp_path / "arith.jsonl", arithmetic_train), tokenizer).prompts
    from_parquet = load(arithmetic_parquet, tokenizer).prompts
    assert [p.uid for p in from_jsonl][:2] == ["arith/0", "arith/1"]
    assert [p.prompt_token_ids for p in from_jsonl] == [p.prompt_token_ids for p in from_parquet]
    tests = json.dumps({"inputs": ["1\n"], "outputs": ["2\n"]})
    rows = [{"data_source": "codegen__demo", "prompt": [{"role": "system", "content": "Write Python."},
                                                        {"role": "user", "content": "Add one."}],
             "reward_model": {"ground_truth": tests}},  # no extra_info, no ability: the loop needs neither
            {"data_source": "math_dapo", "prompt": [{"role": "user", "content": "2+2?"}],
             "reward_model": {"ground_truth": ["4", "four"]}, "extra_info": {"index": "dapo-7"}}]
    code, listed = load(write_jsonl(tmp_path / "mixed.jsonl", rows), tokenizer).prompts
    assert (code.uid, code.ground_truth, code.extra_info) == ("mixed/0", tests, {})
    assert tokenizer.decode(code.prompt_token_ids).startswith("<|im_start|>system\nWrite Python.<|im_end|>\n")
    assert (listed.uid, listed.ground_truth) == ("mixed/dapo-7", ["4", "four"])


def test_raw_gsm8k_rows_get_verls_gsm8k_prompt(gsm8k_head, gsm8k_dir, arithmetic_parquet, tokenizer):
    prompt_set = load([str(gsm8k_head), str(arithmetic_parquet)], tokenizer)
    assert (len(prompt_set), prompt_set.rows_read) == (28, 28)
    natalia, weng = prompt_set.prompts[:2]
    question = json.loads((gsm8k_dir / "train.jsonl").open().readline())["question"]
    assert natalia.messages == [{"role": "user", "content": f"{question} {INSTRUCTION}"}]
    # "... 72 clips altogether in April and May.\n#### 72" and "... earned ... $10.\n#### 10"
    assert (natalia.uid, natalia.data_source, natalia.ground_truth) == ("gsm8k_head/0", "openai/gsm8k", "72")
    assert (weng.uid, weng.ground_truth, weng.extra_info["index"]) == ("gsm8k_head/1", "10", 1)
    assert [len(p.prompt_token_ids) for p in prompt_set.prompts[:8]] == GSM8K_HEAD_LENGTHS
    assert prompt_set.prompts[8].uid == "train/0"


def test_overlong_prompts_are_dropped_and_counted_when_filtering(gsm8k_head, tokenizer):
    # 154 tokens is exactly the limit (kept); 187, 189, 179 and 309 are over it
    prompt_set = load(gsm8k_head, tokenizer, max_prompt_length=154, filter_overlong_prompts=True)
    assert [p.uid for p in prompt_set.prompts] == ["gsm8k_head/0", "gsm8k_head/1", "gsm8k_head/3", "gsm8k_head/4"]
    assert (prompt_set.rows_read, prompt_set.overlong_dropped) == (8, 4)


def test_an_overlong_prompt_without_the_filter_is_an_error_naming_the_row_and_both_keys(gsm8k_head, tokenizer):
    with pytest.raises(ConfigError) as error:
        load(gsm8k_head, tokenizer, max_prompt_length=154)
    message = str(error.value)
    assert message.startswith(f"{gsm8k_head}:3: prompt is 187 tokens, longer than data.max_prompt_length=154 "
                              "(4 of 8 prompts are)")
    assert "data.filter_overlong_prompts=true" in message


def test_nothing_left_after_filtering_is_an_error(gsm8k_head, tokenizer):
    with pytest.raises(ConfigError, match="no training prompts left: all 8 are longer than data.max_prompt_length=50"):
        load(gsm8k_head, tokenizer, max_prompt_length=50, filter_overlong_prompts=True)


def test_unknown_data_source_fails_at_load(arithmetic_train, tokenizer, tmp_path):
    rows = [arithmetic_train[0], {**arithmetic_train[1], "data_source": "mystery"}]
    path = write_parquet_atomic(rows, tmp_path / "mystery.parquet")
    with pytest.raises(RowError, match=r"mystery.parquet row 1: no scorer for data_source 'mystery'"):
        load(path, tokenizer)


def test_rows_of_another_shape_are_refused_naming_the_line(gsm8k_head, tokenizer, tmp_path):
    path = tmp_path / "problems.jsonl"
    path.write_text(gsm8k_head.read_text().splitlines()[0] + "\n" + '{"problem": "1+1?", "answer": "2"}\n')
    with pytest.raises(RowError, match=r"problems.jsonl:2: expected a verl row .* got fields \['answer', 'problem'\]"):
        load(path, tokenizer)
    no_truth = {"data_source": "arithmetic", "prompt": [{"role": "user", "content": "1+1?"}], "reward_model": {}}
    with pytest.raises(RowError, match=r"truth.jsonl:1: field 'reward_model.ground_truth' is missing"):
        load(write_jsonl(tmp_path / "truth.jsonl", [no_truth]), tokenizer)
    bad_prompt = {**no_truth, "prompt": "1+1?", "reward_model": {"ground_truth": "2"}}
    with pytest.raises(RowError, match=r"text.jsonl:1: field 'prompt' must be a non-empty list"):
        load(write_jsonl(tmp_path / "text.jsonl", [bad_prompt]), tokenizer)


def test_repeated_uids_are_refused(arithmetic_parquet, tokenizer):
    repeated = r"train.parquet row 0: uid 'train/0' was already given to .*train.parquet row 0"
    with pytest.raises(RowError, match=repeated):
        load([str(arithmetic_parquet), str(arithmetic_parquet)], tokenizer)


def test_missing_files_and_no_rows(arithmetic_parquet, tokenizer, tmp_path):
    with pytest.raises(InputNotFoundError, match=r"training data not found: .*absent.parquet"):
        load([str(arithmetic_parquet), str(tmp_path / "absent.parquet")], tokenizer)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ConfigError, match=r"no training prompts: .*empty.jsonl hold no rows"):
        load(tmp_path / "empty.jsonl", tokenizer)
    with pytest.raises(ConfigError, match="data.train_files names no files"):
        load([], tokenizer)
    with pytest.raises(ConfigError, match="data.max_prompt_length must be a whole number >= 1, got 0"):
        load(arithmetic_parquet, tokenizer, max_prompt_length=0)


def test_max_samples_picks_verls_subset_before_the_overlong_filter(gsm8k_head, tokenizer):
    first = load(gsm8k_head, tokenizer, max_samples=3, shuffle=False)
    assert [p.uid for p in first.prompts] == ["gsm8k_head/0", "gsm8k_head/1", "gsm8k_head/2"]
    assert first.rows_read == 8
    # verl: np.random.default_rng(seed).choice(total, size=max_samples, replace=False), in that order
    chosen = np.random.default_rng(5).choice(8, size=4, replace=False).tolist()
    drawn = load(gsm8k_head, tokenizer, max_samples=4, seed=5)
    assert [p.uid for p in drawn.prompts] == [f"gsm8k_head/{i}" for i in chosen]
    filtered = load(gsm8k_head, tokenizer, max_prompt_length=154, filter_overlong_prompts=True, max_samples=4,
                    seed=5)
    assert [p.uid for p in filtered.prompts] == [f"gsm8k_head/{i}" for i in chosen if GSM8K_HEAD_LENGTHS[i] <= 154]
    assert filtered.overlong_dropped == sum(GSM8K_HEAD_LENGTHS[i] > 154 for i in chosen)


@pytest.fixture()
def prompts(arithmetic_parquet, tokenizer):
    return load(arithmetic_parquet, tokenizer).prompts[:10]  # uids train/0 .. train/9


def indices(batch):
    return [int(prompt.uid.split("/")[1]) for prompt in batch]


def draw(sampler, count):
    return [indices(sampler.next_batch()) for _ in range(count)]


def test_unshuffled_batches_drop_the_remainder_of_each_epoch(prompts):
    sampler = PromptSampler(prompts, batch_size=4, shuffle=False)
    # 10 prompts, batches of 4: 2 steps per epoch, prompts 8 and 9 never drawn
    assert (sampler.steps_per_epoch, sampler.total_steps(3)) == (2, 6)
    assert draw(sampler, 3) == [[0, 1, 2, 3], [4, 5, 6, 7], [0, 1, 2, 3]]
    assert (sampler.epoch, sampler.batch_in_epoch) == (1, 1)


@pytest.mark.parametrize("seed", [7, None])
def test_shuffled_batches_are_verls_dataloader_order(prompts, seed):
    # verl's train loader: a RandomSampler on a torch.Generator seeded with data.seed (untouched when null),
    # batch_size=data.train_batch_size, drop_last=True, iterated epoch after epoch
    generator = torch.Generator()
    if seed is not None:
        generator.manual_seed(seed)
    loader = DataLoader(list(range(10)), batch_size=3, drop_last=True,
                        sampler=RandomSampler(range(10), generator=generator))
    expected = [batch.tolist() for _ in range(4) for batch in loader]
    sampler = PromptSampler(prompts, batch_size=3, seed=seed)
    assert draw(sampler, 12) == expected
    epochs = [[i for batch in expected[3 * e:3 * e + 3] for i in batch] for e in range(4)]
    assert all(len(set(epoch)) == 9 for epoch in epochs) and epochs[0] != epochs[1]


def test_same_seed_same_batches_other_seed_other_batches(prompts):
    assert draw(PromptSampler(prompts, 4, seed=1), 6) == draw(PromptSampler(prompts, 4, seed=1), 6)
    assert draw(PromptSampler(prompts, 4, seed=1), 6) != draw(PromptSampler(prompts, 4, seed=2), 6)


@pytest.mark.parametrize("saved_after", [2, 3, 4])  # mid-epoch, exactly at the epoch boundary, past it
def test_a_resumed_sampler_draws_what_an_uninterrupted_one_would(prompts, saved_after):
    uninterrupted = draw(PromptSampler(prompts, batch_size=3, seed=11), 6)  # 3 steps per epoch: 2 epochs
    interrupted = PromptSampler(prompts, batch_size=3, seed=11)
    draw(interrupted, saved_after)
    state = json.loads(json.dumps(interrupted.state_dict()))
    resumed = PromptSampler(prompts, batch_size=3, seed=11)
    resumed.load_state_dict(state)
    assert draw(resumed, 6 - saved_after) == uninterrupted[saved_after:]
    assert {key: state[key] for key in ("epoch", "batch_in_epoch", "seed")} == \
        {"epoch": saved_after // 3, "batch_in_epoch": saved_after % 3, "seed": 11}


def test_a_state_saved_with_other_settings_is_refused(prompts):
    state = PromptSampler(prompts, batch_size=3, seed=11).state_dict()
    with pytest.raises(ConfigError, match="sampler state was saved with .*'seed': 11.* but this run has .*'seed': 12"):
        PromptSampler(prompts, batch_size=3, seed=12).load_state_dict(state)
    with pytest.raises(ConfigError, match="'batch_in_epoch' must be below 3, got 3"):
        PromptSampler(prompts, batch_size=3, seed=11).load_state_dict({**state, "batch_in_epoch": 3})


def test_a_batch_larger_than_the_data_is_refused(prompts):
    with pytest.raises(ConfigError, match="data.train_batch_size=11 is more than the 10 training prompts"):
        PromptSampler(prompts, batch_size=11)
    with pytest.raises(ConfigError, match="data.seed must be a whole number >= 0 or null, got '1'"):
        PromptSampler(prompts, batch_size=2, seed="1")
