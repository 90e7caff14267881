"""``flash-rc train``: the single-node RL loop — quantized rollouts, rewards, a TIS-corrected FSDP2 update, one sync.

Run it as ``flash-rc train --config RECIPE [key=value ...]`` (one process) or
``torchrun --nproc_per_node N -m flash_rc.backends.local --config RECIPE ...`` (N ranks, one per device). Each step:

1. rank 0's engine generates ``rollout.n`` samples for each of ``data.train_batch_size`` prompts at the recipe's
   precision (``flash_rc.engine.precision``), with processed rollout log-probs; the reward pool scores them; the
   rollout source turns rewards into advantages (:mod:`flash_rc.backends.local.rollout`);
2. the batch goes to every rank; the learner recomputes π_old (and π_ref with the KL loss) and runs the update
   (:mod:`flash_rc.learner.learner`);
3. **one** weight sync learner → engine (``Learner.sync`` → ``RolloutEngine.load``), its report in the metrics;
4. validation every ``trainer.test_freq`` steps, a checkpoint every ``trainer.save_freq`` steps (and both at the end),
   one metrics record per step (``metrics.jsonl`` + ``trainer.logger``).

Everything a recipe can get wrong is checked first (:func:`~flash_rc.backends.local.config.check_train_recipe`), before
any process group, model or engine starts. With ``trainer.resume_mode=auto`` a run directory that holds checkpoints
resumes from the latest complete one; weights, optimizer, schedule, data position and RNG states continue exactly.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch.distributed as dist

from flash_rc.backends.local.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from flash_rc.backends.local.config import TrainRecipe, check_train_recipe, sequences_per_prompt
from flash_rc.backends.local.rollout import (
    OutcomeRollout,
    OutcomeSettings,
    RolloutBatch,
    RolloutShards,
    validation_metrics,
)
from flash_rc.config import engine_config, load_recipe
from flash_rc.errors import ConfigError, WeightUpdateError
from flash_rc.learner.distributed import World, init_world, world_size_from_env

ENGINE_RANK = 0
"""The rank that hosts the rollout engine (and the reward pool) when only one does; it also validates."""


def engines_on_every_rank(recipe: TrainRecipe, on_gpu: bool) -> bool:
    choice = recipe.flash_rc.train.engine_ranks
    return choice == "all" or (choice == "auto" and on_gpu)


def rank_engine_config(recipe: TrainRecipe, world: World, every_rank: bool):
    """The engine this rank starts: the recipe's, with vLLM sleep mode on GPU (``rollout.free_cache_engine``) and,
    when every rank of a multi-GPU world hosts one, vLLM's ``external_launcher`` executor (it takes its device from
    ``LOCAL_RANK`` and joins the torchrun world instead of starting its own)."""
    config = engine_config(recipe)
    update = {}
    if world.device.type == "cuda":
        update["enable_sleep_mode"] = recipe.actor_rollout_ref.rollout.free_cache_engine
        if every_rank and world.size > 1:
            update["engine_kwargs"] = {"distributed_executor_backend": "external_launcher", **config.engine_kwargs}
    return config.model_copy(update=update)


def check_resume(recipe: TrainRecipe) -> tuple[int, Path] | None:
    """The checkpoint to resume from, or None; a fresh run over existing checkpoints is refused."""
    latest = latest_checkpoint(recipe.trainer.run_dir)
    if latest is not None and recipe.trainer.resume_mode == "disable":
        raise ConfigError(f"{recipe.trainer.run_dir} already holds checkpoints (latest: {latest[1].name}); set "
                          "trainer.resume_mode=auto to resume, or choose another trainer.default_local_dir")
    return latest if recipe.trainer.resume_mode == "auto" else None


def _broadcast(value: Any, world: World) -> Any:
    if world.size == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=ENGINE_RANK)
    return box[0]


def _learner_settings(recipe: TrainRecipe, total_steps: int):
    from flash_rc.learner.learner import LearnerSettings

    # the recipe's model section is an ActorModelKeys (with the engine's keys besides)
    return LearnerSettings(actor=recipe.actor_rollout_ref.actor, model=recipe.actor_rollout_ref.model,
                           correction=recipe.algorithm.rollout_correction.config(), total_steps=total_steps)


def _outcome_settings(recipe: TrainRecipe):
    from flash_rc.algo.advantages import OverlongConfig

    data, rollout, algorithm = recipe.data, recipe.actor_rollout_ref.rollout, recipe.algorithm
    kwargs = recipe.reward.reward_kwargs
    overlong = kwargs.overlong_buffer_cfg
    return OutcomeSettings(
        train_batch_size=data.train_batch_size, n=rollout.n, temperature=rollout.temperature,
        max_response_length=data.max_response_length, adv_estimator=algorithm.adv_estimator,
        norm_adv_by_std=algorithm.norm_adv_by_std_in_grpo, filter_groups=algorithm.filter_groups.enable,
        filter_metric=algorithm.filter_groups.metric, max_num_gen_batches=algorithm.filter_groups.max_num_gen_batches,
        overlong=OverlongConfig(max_response_length=kwargs.max_resp_len or data.max_response_length,
                                buffer_length=overlong.len, penalty_factor=overlong.penalty_factor)
        if overlong.enable else None,
        rollout_seed=recipe.flash_rc.train.rollout_seed,
    )


def _rollout_source(recipe: TrainRecipe, engine, sampler, shards: RolloutShards, train, world: World):
    """Plain outcome RL, or RC states (``flash_rc.rc.enable``) with the summary replay buffer when it is on."""
    rc = recipe.flash_rc.rc
    if not rc.enable:
        return OutcomeRollout(engine, sampler, _outcome_settings(recipe), shards)
    from flash_rc.backends.local.rc_rollout import RCRollout
    from flash_rc.rc.replay import SummaryReplayBuffer

    buffer = None
    if rc.replay.enable:
        buffer = SummaryReplayBuffer(rc.replay, seed=recipe.flash_rc.train.rollout_seed)
        if rc.replay.initial_path:
            counts = buffer.load_initial(rc.replay.initial_path, {p.uid for p in train.prompts})
            if world.is_main:
                print(f"flash-rc train: replay buffer {rc.replay.initial_path}: {counts}", flush=True)
    return RCRollout(engine, sampler, _outcome_settings(recipe), rc, buffer, shards)


def _recipe_yaml(recipe: TrainRecipe) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.create(recipe.model_dump(mode="json")))


def run_training(recipe: TrainRecipe) -> dict[str, Any]:
    """Train as the recipe says; returns a summary (steps run, last metrics, checkpoints, run directory)."""
    from tqdm import tqdm
    from transformers import AutoTokenizer

    from flash_rc.backends.local.metrics import MetricsLogger
    from flash_rc.data.prompts import PromptSampler, load_train_prompts
    from flash_rc.learner.learner import Learner
    from flash_rc.models import resolve_model
    from flash_rc.rollout import vllm_compat

    world_size = world_size_from_env()
    check_train_recipe(recipe, world_size)
    resume = check_resume(recipe)
    data, trainer, rollout = recipe.data, recipe.trainer, recipe.actor_rollout_ref.rollout
    model_path = resolve_model(recipe.actor_rollout_ref.model.path)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    train = load_train_prompts(data.train_files, tokenizer, data.max_prompt_length, data.filter_overlong_prompts,
                               data.train_max_samples, data.shuffle, data.seed)
    val = load_train_prompts(data.val_files, tokenizer, data.max_prompt_length, data.filter_overlong_prompts,
                             data.val_max_samples, False, data.seed) if data.val_files else None
    sampler = PromptSampler(train.prompts, data.train_batch_size, data.shuffle, data.seed)
    total_steps = trainer.total_training_steps or sampler.total_steps(trainer.total_epochs)
    world = init_world()
    vllm_compat.join_distributed_world(world.local_rank)
    learner = Learner(model_path, _learner_settings(recipe, total_steps), world)
    every_rank = engines_on_every_rank(recipe, world.device.type == "cuda")
    engine = logger = None
    start_step = 0
    try:
        if every_rank or world.rank == ENGINE_RANK:
            from flash_rc.rollout.engine import RolloutEngine

            engine = RolloutEngine(rank_engine_config(recipe, world, every_rank))
        source = _rollout_source(recipe, engine, sampler, RolloutShards(world if every_rank else None), train, world)
        if resume is not None:
            state = load_checkpoint(resume[1], learner, world)
            start_step = state["step"]
            source.load_state_dict(state["source"])
            learner.sync(engine)  # the engine started from the base model
        run_dir = recipe.trainer.run_dir
        logger = MetricsLogger(trainer.logger, project_name=trainer.project_name,
                               experiment_name=trainer.experiment_name, run_dir=run_dir,
                               config=recipe.model_dump(mode="json"),
                               resume_step=start_step if resume else None) if world.is_main else None
        val_sampling = rollout.val_kwargs.sampling()
        val_sampling.n, val_sampling.max_tokens = rollout.val_kwargs.n, data.max_response_length

        def validate() -> dict[str, float]:
            metrics = validation_metrics(engine, val.prompts, val_sampling, recipe.flash_rc.train.rollout_seed) \
                if world.rank == ENGINE_RANK else {}
            world.barrier()
            return metrics

        if val is not None and trainer.val_before_train and start_step == 0:
            metrics = validate()
            if logger is not None:
                logger.log(0, metrics)
        checkpoints = []
        last: dict[str, float] = {}
        bar = tqdm(range(start_step + 1, total_steps + 1), desc="steps", initial=start_step, total=total_steps,
                   disable=not (world.is_main and recipe.flash_rc.train.progress))
        for step in bar:
            last = _train_step(step, source, learner, engine, world, recipe, every_rank)
            is_last = step == total_steps
            if val is not None and ((trainer.test_freq > 0 and step % trainer.test_freq == 0) or is_last):
                started = time.perf_counter()
                last.update(validate())
                last["timing_s/validation"] = time.perf_counter() - started
            if (trainer.save_freq > 0 and step % trainer.save_freq == 0) or is_last:
                started = time.perf_counter()
                checkpoints.append(save_checkpoint(run_dir, step, learner, {"source": source.state_dict()},
                                                   _recipe_yaml(recipe), world, trainer.max_actor_ckpt_to_keep))
                last["timing_s/checkpoint"] = time.perf_counter() - started
            if logger is not None:
                logger.log(step, last)
                bar.set_postfix(reward=f"{last.get('critic/rewards/mean', 0):.3f}")
        world.barrier()
        return {"steps": total_steps - start_step, "resumed_from": start_step, "last_metrics": last,
                "checkpoints": [str(c) for c in checkpoints], "run_dir": str(run_dir)}
    finally:
        if logger is not None:
            logger.close()
        if engine is not None:
            engine.close()  # also tears down the process group (vLLM owns it from here)
        elif dist.is_initialized():
            dist.destroy_process_group()


def _train_step(step: int, source, learner, engine, world: World, recipe: TrainRecipe, every_rank: bool
                ) -> dict[str, float]:  # fmt: skip
    actor, rollout = recipe.actor_rollout_ref.actor, recipe.actor_rollout_ref.rollout
    started = time.perf_counter()
    if every_rank:  # each rank samples its share; the source merges them, so every rank holds the whole batch
        batch = source.collect(step)
    else:
        batch = _broadcast(source.collect(step) if world.rank == ENGINE_RANK else None, world)
    assert isinstance(batch, RolloutBatch)
    metrics = dict(batch.metrics)
    metrics["timing_s/rollout"] = time.perf_counter() - started
    sequences = batch.sequences
    if not sequences:  # every group filtered out or failed: nothing to learn from, the weights stay
        metrics.update({"actor/empty_step": 1.0, "timing_s/step": time.perf_counter() - started})
        return metrics
    sleeping = engine is not None and engine.config.enable_sleep_mode
    if sleeping:  # the device memory goes to the learner until the sync
        engine.sleep()
    phase = time.perf_counter()
    old = learner.log_probs(sequences, rollout.temperature)
    ref = learner.log_probs(sequences, rollout.temperature, reference=True) if actor.use_kl_loss else None
    metrics["timing_s/old_log_prob"] = time.perf_counter() - phase
    phase = time.perf_counter()
    metrics.update(learner.update(sequences, old, ref, rollout.temperature,
                                  actor.ppo_mini_batch_size * sequences_per_prompt(recipe)))
    update_seconds = time.perf_counter() - phase
    skipped = metrics["actor/nonfinite_grad_skipped_steps"]
    if skipped and world.is_main:
        print(f"flash-rc train: step {step}: non-finite gradient norm, {skipped:.0f} optimizer step(s) skipped "
              "(weights unchanged by them)", flush=True)
    tokens = sum(s.num_tokens for s in sequences) * actor.ppo_epochs
    metrics.update({"timing_s/update": update_seconds, "perf/learner_tokens_per_s": tokens / max(update_seconds, 1e-9),
                    "actor/empty_step": 0.0})
    phase = time.perf_counter()
    if sleeping:
        engine.wake_up(["weights"])
    try:
        report = learner.sync(engine)
        metrics["sync/failed"] = 0.0
        if report is not None:
            metrics.update(report.metrics)
            metrics["sync/model_version"] = float(report.model_version)
    except WeightUpdateError as error:  # the engine keeps serving the weights it had; the next step syncs again
        metrics["sync/failed"] = 1.0
        if world.is_main:
            print(f"flash-rc train: step {step}: weight sync failed, the engine keeps its weights: "
                  f"{str(error).splitlines()[0]}", flush=True)
    if sleeping:
        engine.wake_up(["kv_cache"])
    metrics["timing_s/sync"] = time.perf_counter() - phase
    metrics["timing_s/step"] = time.perf_counter() - started
    metrics["perf/total_tokens"] = float(sum(s.num_tokens for s in sequences))
    return metrics


def main(argv: list[str]) -> int:
    from flash_rc.cli import recipe_arguments

    args = recipe_arguments("flash-rc train", __doc__.split("\n\n")[0], "trainer.total_training_steps=2", argv)
    recipe = load_recipe(TrainRecipe, args.config, args.overrides)
    if args.no_progress:
        recipe.flash_rc.train.progress = False
    summary = run_training(recipe)
    if os.environ.get("RANK", "0") == "0":
        last = summary["last_metrics"]
        print(f"trained {summary['steps']} steps (resumed from step {summary['resumed_from']}); last reward "
              f"{last.get('critic/rewards/mean', float('nan')):.3f}; checkpoints in {summary['run_dir']}")
    return 0
