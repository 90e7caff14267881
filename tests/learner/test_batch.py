"""The batch contract and micro-batch layouts: where every response token's logit comes from."""

import pytest
import torch

from flash_rc.learner.batch import TrainSequence, make_micro_batch, pad_rows, split_micro_batches


def seq(prompt, response, advantage=1.0):
    return TrainSequence(tuple(prompt), tuple(response), tuple(-0.5 for _ in response), advantage)


SEQS = [seq([1, 2, 3], [4, 5]), seq([6], [7, 8, 9]), seq([10, 11], [])]


def test_train_sequence_checks_alignment():
    with pytest.raises(ValueError, match="2 rollout log-probs for 1 response tokens"):
        TrainSequence((1,), (2,), (-0.1, -0.2), 0.0)
    with pytest.raises(ValueError, match="at least one prompt token"):
        TrainSequence((), (2,), (-0.1,), 0.0)
    assert SEQS[0].num_tokens == 5


def test_padded_layout_sorted_longest_first():
    batch = make_micro_batch(SEQS, [0, 1, 2], "padded", pad_token_id=0)
    # lengths 5, 4, 2 -> already longest first; rows padded to 5
    assert batch.indices == [0, 1, 2]
    assert batch.input_ids.tolist() == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 0], [10, 11, 0, 0, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0], [1, 1, 0, 0, 0]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4], [0, 1, 2, 3, 3], [0, 1, 1, 1, 1]]
    # response 4,5 of row 0 are predicted at positions 2,3; 7,8,9 of row 1 at 0,1,2 (flat 5,6,7)
    assert batch.logit_index.tolist() == [2, 3, 5, 6, 7]
    assert batch.targets.tolist() == [4, 5, 7, 8, 9]
    assert batch.response_lengths == [2, 3, 0]


def test_padded_layout_reorders_and_keeps_indices():
    batch = make_micro_batch(SEQS, [2, 1], "padded", pad_token_id=0)
    assert batch.indices == [1, 2]  # the 4-token sequence first
    assert batch.targets.tolist() == [7, 8, 9]


def test_packed_layout_one_row_restarting_positions():
    batch = make_micro_batch(SEQS, [0, 1], "packed", pad_token_id=0)
    assert batch.input_ids.tolist() == [[1, 2, 3, 4, 5, 6, 7, 8, 9]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3]]
    assert batch.attention_mask is None
    # sequence 1 starts at offset 5: its prompt token (6) at 5 predicts 7, then 6 -> 8, 7 -> 9
    assert batch.logit_index.tolist() == [2, 3, 5, 6, 7]


def test_fixed_size_micro_batches():
    assert split_micro_batches(SEQS, [0, 1, 2], micro_batch_size=2, max_tokens=None, layout="padded") == [[0, 1], [2]]


def test_token_budget_padded_counts_rows_times_longest():
    # longest first: 5, 4, 2 tokens. budget 8: [0] (5), then 1 cannot join (2*5=10 > 8) -> new bin; 2 joins bin 0
    # (2*5=10 > 8, no) -> bin 1: 2 rows * 4 = 8 fits
    assert split_micro_batches(SEQS, [0, 1, 2], micro_batch_size=None, max_tokens=8, layout="padded") == [[0], [1, 2]]
    # packed sums tokens: 5 + 2 = 7 <= 8 -> [0, 2], then [1]
    assert split_micro_batches(SEQS, [0, 1, 2], micro_batch_size=None, max_tokens=8, layout="packed") == [[0, 2], [1]]
    # a sequence over the budget gets a micro-batch of its own
    assert split_micro_batches(SEQS, [0, 1], micro_batch_size=None, max_tokens=3, layout="packed") == [[0], [1]]


def test_split_needs_exactly_one_rule():
    with pytest.raises(ValueError, match="exactly one"):
        split_micro_batches(SEQS, [0], micro_batch_size=1, max_tokens=4, layout="padded")


def test_pad_rows():
    out = pad_rows([torch.tensor([1.0, 2.0]), torch.tensor([3.0])], fill=-1.0)
    assert out.tolist() == [[1.0, 2.0], [3.0, -1.0]]
