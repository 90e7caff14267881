"""One learner update on a fixed global batch, run by tests/learner/test_distributed.py under torchrun (1 or 2 ranks).

Writes the updated weights and the step's metrics (rank 0) to the file given as the first argument.
"""

import sys

import torch

from flash_rc.algo.rollout_correction import RolloutCorrectionConfig
from flash_rc.learner.batch import TrainSequence
from flash_rc.learner.config import ActorModelKeys, ActorSection
from flash_rc.learner.distributed import init_world
from flash_rc.learner.learner import Learner, LearnerSettings
from flash_rc.models import resolve_model
from flash_rc.rollout.checkpoint import full_tensor


def global_batch() -> list[TrainSequence]:
    gen = torch.Generator().manual_seed(1)
    batch = []
    for k in range(8):
        prompt = torch.randint(5, 300, (2 + k % 4,), generator=gen).tolist()
        response = torch.randint(5, 300, (1 + (3 * k) % 6,), generator=gen).tolist()
        rollout = (-torch.rand(len(response), generator=gen) * 4).tolist()
        batch.append(TrainSequence(tuple(prompt), tuple(response), tuple(rollout), advantage=(-1.0) ** k * (k + 1) / 4))
    return batch


class RecordingSink:
    """A weight sink that only records what reaches it (the collective checks run before any sink is touched)."""

    def __init__(self, names):
        from flash_rc.rollout.formats import WeightFormat

        self.checkpoint_shapes = dict.fromkeys(names, ())
        self.weight_format = WeightFormat(precision="bf16", dtype=torch.bfloat16)
        self.loads = 0

    def load(self, source, stats=None):
        self.loads += 1
        raise AssertionError("a refused sync must not reach the engine")


def refuse_sync(output: str) -> None:
    """Rank 1 holds a NaN in its shard; rank 0 hosts the (recording) engine: every rank must refuse the sync."""
    from flash_rc.errors import WeightUpdateError

    world = init_world()
    actor = ActorSection.model_validate({"ppo_mini_batch_size": 1, "ppo_micro_batch_size_per_gpu": 1})
    learner = Learner(resolve_model("tiny-qwen2"),
                      LearnerSettings(actor, ActorModelKeys(), RolloutCorrectionConfig(), total_steps=1), world)
    sink = RecordingSink(learner.state_source().state_dict()) if world.is_main else None
    if world.rank == 1:
        with torch.no_grad():
            learner.state_source().get_decoder().layers[1].mlp.up_proj.weight.to_local().view(-1)[0] = float("nan")
    try:
        learner.sync(sink)
        outcome = "applied"
    except WeightUpdateError as error:
        outcome = str(error)
    outcomes = [None] * world.size
    torch.distributed.all_gather_object(outcomes, outcome)
    if world.is_main:
        torch.save({"outcomes": outcomes, "loads": sink.loads}, output)
    torch.distributed.barrier()  # every rank done with its collectives before any tears the group down
    torch.distributed.destroy_process_group()


def main(output: str, micro_batch_size: int) -> None:
    world = init_world()
    actor = ActorSection.model_validate({
        "ppo_mini_batch_size": 2, "ppo_micro_batch_size_per_gpu": micro_batch_size, "ppo_epochs": 2,
        "fsdp_config": {"mixed_precision": {"param_dtype": "fp32"}}, "optim": {"lr": 1e-3},
        "use_kl_loss": True, "entropy_coeff": 0.01,
    })
    learner = Learner(resolve_model("tiny-qwen2"),
                      LearnerSettings(actor, ActorModelKeys(), RolloutCorrectionConfig(), total_steps=2), world)
    batch = global_batch()
    old = learner.log_probs(batch, 0.8)
    ref = learner.log_probs(batch, 0.8, reference=True)
    old = [None if values is None else values - 0.1 for values in old]  # a PPO ratio away from 1
    metrics = learner.update(batch, old, ref, 0.8, mini_batch_sequences=4)
    weights = {name: full_tensor(t).clone() for name, t in learner.state_source().state_dict().items()}
    if world.is_main:
        torch.save({"weights": weights, "metrics": metrics}, output)
    torch.distributed.barrier()  # every rank done with its collectives before any tears the group down
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    if sys.argv[2] == "refuse-sync":
        refuse_sync(sys.argv[1])
    else:
        main(sys.argv[1], int(sys.argv[2]))
