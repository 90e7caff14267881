"""Data parallelism gives the update of one big batch: 2 gloo ranks under torchrun equal 1 rank on the same batch.

Each rank holds half of every mini-batch (and a different micro-batch split); the loss is normalised by the global
token / sequence counts and scaled by the rank count, FSDP averages the gradients, so after two PPO epochs of two
mini-batches with the KL loss and the entropy bonus on, the weights and the loss metrics must agree.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).with_name("distributed_step.py")


def run_step(tmp_path: Path, ranks: int, micro_batch_size: int | str) -> dict:
    output = tmp_path / f"step_{ranks}.pt"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
               str(SCRIPT), str(output), str(micro_batch_size)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(output, weights_only=False)


def test_two_ranks_equal_one_rank(tmp_path):
    one = run_step(tmp_path, ranks=1, micro_batch_size=4)
    two = run_step(tmp_path, ranks=2, micro_batch_size=1)  # 2 sequences per rank per mini-batch, one at a time
    assert one["metrics"]["actor/optimizer_steps"] == two["metrics"]["actor/optimizer_steps"] == 4
    for key in ("actor/pg_loss", "actor/kl_loss", "actor/entropy", "actor/grad_norm", "rollout_corr/kl"):
        assert two["metrics"][key] == pytest.approx(one["metrics"][key], rel=1e-4, abs=1e-6), key
    # Gradients agree to float rounding (the pre-clip norm above, to 1e-4); AdamW divides each gradient entry by its
    # own running RMS, which turns the rounding noise of entries whose exact gradient is 0 (k_proj.bias: softmax
    # ignores a key bias) into steps of up to ±lr. So the weights agree to a tenth of one lr step (lr = 1e-3).
    for name, weight in one["weights"].items():
        torch.testing.assert_close(two["weights"][name], weight, atol=1e-4, rtol=0, msg=name)



def test_a_bad_shard_on_one_rank_refuses_the_sync_on_every_rank(tmp_path):
    result = run_step(tmp_path, ranks=2, micro_batch_size="refuse-sync")
    assert result["loads"] == 0
    for outcome in result["outcomes"]:  # both ranks raised, naming the tensor rank 1 holds
        assert "sync refused on every rank" in outcome and "model.layers.1.mlp.up_proj.weight" in outcome
