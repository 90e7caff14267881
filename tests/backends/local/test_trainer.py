"""``flash-rc train`` end to end on the tiny model, as a user runs it: the real CLI in a subprocess (one engine per
process), the real vLLM engine, FSDP2 learner, reward pool and checkpoints.

The random tiny model never solves arithmetic, so the data here uses a test scorer (``parity``: score 1 when the
response has an even number of characters) that makes groups differ and gives the loss something to learn from.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flash_rc.data.rows import make_row, write_parquet_atomic

SCORER = '''
def parity(solution_str, ground_truth, extra_info=None):
    even = len(solution_str) % 2 == 0
    return {"score": float(even), "acc": even, "pred": None, "reason": "correct" if even else "wrong_answer"}
'''
PLUGIN = '''
from flash_rc.rewards.router import register_scorer
from flash_rc.rewards.types import ScorerRoute
register_scorer("test/parity", ScorerRoute("{path}:parity", timeout_s=5.0))
'''


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """Train/val parquet rows scored by the parity scorer, and a sitecustomize that registers it in every process."""
    root = tmp_path_factory.mktemp("train")
    (root / "scorers.py").write_text(SCORER)
    (root / "sitecustomize.py").write_text(PLUGIN.format(path=root / "scorers.py"))
    rows = [make_row("test/parity", f"What is {a} + {b}?", "math", str(a + b), "train", i, str(a + b), f"{a}+{b}")
            for i, (a, b) in enumerate((a, b) for a in range(6) for b in range(4))]
    write_parquet_atomic(rows[:20], root / "train.parquet")
    write_parquet_atomic(rows[20:], root / "val.parquet")
    return root


def recipe_args(workspace: Path, run_dir: Path, *overrides: str) -> list[str]:
    return [
        f"data.train_files={workspace / 'train.parquet'}", f"data.val_files={workspace / 'val.parquet'}",
        "data.train_batch_size=4", "data.max_prompt_length=64", "data.max_response_length=12", "data.seed=3",
        "actor_rollout_ref.model.path=tiny-qwen2", "actor_rollout_ref.rollout.n=4",
        "actor_rollout_ref.rollout.max_model_len=128", "actor_rollout_ref.actor.ppo_mini_batch_size=2",
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4", "actor_rollout_ref.actor.optim.lr=1e-3",
        "actor_rollout_ref.actor.fsdp_config.mixed_precision.param_dtype=fp32",
        "algorithm.rollout_correction.rollout_is=token", "flash_rc.engine.kv_cache_gib=0.25",
        "trainer.total_training_steps=3", "trainer.save_freq=1", "trainer.test_freq=3",
        f"trainer.default_local_dir={run_dir}", "trainer.logger=[console]", *overrides,
    ]


def env_for(workspace: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": f"{workspace}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
            "OMP_NUM_THREADS": "1", "FLASH_RC_REWARD_WORKERS": "1", "TQDM_DISABLE": "1"}


def train(workspace: Path, run_dir: Path, *overrides: str, timeout: float = 600) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "flash_rc.cli", "train", "--no-progress", *recipe_args(workspace, run_dir,
                                                                                           *overrides)]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env_for(workspace))


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(checkpoint / "model.safetensors")


@pytest.fixture(scope="module")
def finished_run(workspace) -> Path:
    run_dir = workspace / "run"
    result = train(workspace, run_dir)
    assert result.returncode == 0, result.stderr[-4000:]
    return run_dir


def test_run_logs_every_step_and_learns(finished_run):
    steps = records(finished_run)
    assert [r["step"] for r in steps] == [1, 2, 3]
    for record in steps:
        for key in ("critic/rewards/mean", "critic/advantages/mean", "response_length/mean",
                    "response_length/clip_ratio", "actor/pg_loss", "actor/grad_norm", "actor/lr", "rollout_corr/kl",
                    "rollout_corr/rollout_is_mean", "actor/pg_clipfrac", "sync/seconds", "sync/model_version",
                    "perf/rollout_tokens_per_s", "perf/learner_tokens_per_s", "timing_s/rollout",
                    "timing_s/old_log_prob", "timing_s/update", "timing_s/sync", "timing_s/reward"):
            assert record.get(key) is not None, (record["step"], key)
        assert record["actor/grad_norm"] > 0, "parity rewards make groups differ"
        assert record["sync/failed"] == 0.0 and record["reward/failed"] == 0.0
    assert [r["sync/model_version"] for r in steps] == [1.0, 2.0, 3.0]  # one sync per step
    assert "val/test/parity/acc/mean@1" in steps[-1]
    # an fp32 learner against the engine it synced (bf16, unquantized): log-probs agree closely
    assert all(abs(r["rollout_corr/kl"]) < 5e-2 for r in steps)


def test_checkpoints_are_complete_hf_folders(finished_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    names = sorted(p.name for p in finished_run.iterdir() if p.name.startswith("global_step_"))
    assert names == ["global_step_1", "global_step_2", "global_step_3"]
    assert not list(finished_run.glob(".global_step_*"))
    last = finished_run / "global_step_3"
    for part in ("config.json", "model.safetensors", "tokenizer_config.json", "optimizer", "learner_state.pt",
                 "rng_rank0.pt", "trainer_state.json", "recipe.yaml"):
        assert (last / part).exists(), part
    state = json.loads((last / "trainer_state.json").read_text())
    assert state["step"] == 3 and state["source"]["sampler"]["batch_in_epoch"] == 3
    model = AutoModelForCausalLM.from_pretrained(last)
    assert AutoTokenizer.from_pretrained(last).chat_template
    saved = weights(last)
    assert not torch.equal(saved["model.layers.0.mlp.up_proj.weight"],
                           weights(finished_run / "global_step_1")["model.layers.0.mlp.up_proj.weight"])
    torch.testing.assert_close(model.state_dict()["model.norm.weight"], saved["model.norm.weight"])


def test_plain_vllm_serves_a_checkpoint(finished_run, engine_slot, tiny_config):
    """vLLM's own loader reads the checkpoint folder and serves what an HF forward of it computes."""
    from transformers import AutoModelForCausalLM

    from flash_rc.types import SamplingConfig

    checkpoint = finished_run / "global_step_3"
    engine = engine_slot.get(tiny_config(model=str(checkpoint)))
    ((completion,),) = engine.generate([[5, 17, 42, 99]], SamplingConfig(max_tokens=8, seed=1))
    hf = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    ids = torch.tensor([completion.prompt_token_ids + completion.token_ids])
    with torch.no_grad():
        logits = hf(ids).logits[0, len(completion.prompt_token_ids) - 1: -1]
    reference = torch.log_softmax(logits, -1).gather(-1, torch.tensor(completion.token_ids)[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(completion.logprobs), reference, atol=1e-2, rtol=0)


def test_a_finished_run_resumes_as_done_and_a_longer_one_continues(workspace, finished_run, tmp_path):
    import shutil

    run_dir = tmp_path / "continued"
    shutil.copytree(finished_run, run_dir)
    shutil.rmtree(run_dir / "global_step_3")  # as if the run had stopped after step 2
    result = train(workspace, run_dir)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "resumed from step 2" in result.stdout
    assert [r["step"] for r in records(run_dir)] == [1, 2, 3]
    for name, tensor in weights(finished_run / "global_step_3").items():
        torch.testing.assert_close(weights(run_dir / "global_step_3")[name], tensor, atol=0, rtol=0, msg=name)


@pytest.mark.slow
def test_kill_9_mid_step_then_resume_equals_an_uninterrupted_run(workspace, finished_run, tmp_path):
    """Kill the trainer with SIGKILL while it runs step 3 (checkpoint 2 is on disk), resume: the weights, optimizer
    state and step 3's metrics equal those of the run that was never interrupted."""
    run_dir = tmp_path / "killed"
    command = [sys.executable, "-m", "flash_rc.cli", "train", "--no-progress", *recipe_args(workspace, run_dir)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env=env_for(workspace), start_new_session=True)
    deadline = time.monotonic() + 600
    while not (run_dir / "global_step_2" / "trainer_state.json").exists():
        assert process.poll() is None and time.monotonic() < deadline, "the run ended before its second checkpoint"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)  # the whole session: trainer, engine thread, reward workers
    process.wait()
    assert not (run_dir / "global_step_3").exists()
    result = train(workspace, run_dir)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "resumed from step 2" in result.stdout
    reference, resumed = records(finished_run)[-1], records(run_dir)[-1]
    assert [r["step"] for r in records(run_dir)] == [1, 2, 3]
    varying = ("timing_s/", "perf/rollout_tokens_per_s", "perf/learner_tokens_per_s", "sync/")
    for key, value in reference.items():
        if not key.startswith(varying):
            assert resumed[key] == value, key
    for name, tensor in weights(finished_run / "global_step_3").items():
        torch.testing.assert_close(weights(run_dir / "global_step_3")[name], tensor, atol=0, rtol=0, msg=name)
    expected, got = (optimizer_state(path / "global_step_3", tmp_path / f"{i}.pt")
                     for i, path in enumerate((finished_run, run_dir)))
    assert len(expected) > 0 and expected.keys() == got.keys()
    for key, value in expected.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(got[key], value), key
        else:
            assert got[key] == value, key


def optimizer_state(checkpoint: Path, scratch: Path) -> dict:
    """The checkpoint's optimizer state (AdamW's step, exp_avg, exp_avg_sq per parameter), flattened."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(checkpoint / "optimizer", scratch)
    flat = {}

    def walk(prefix, value):
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}.{key}", item)
        elif isinstance(value, (list, tuple)):
            for index, item in enumerate(value):
                walk(f"{prefix}.{index}", item)
        else:
            flat[prefix] = value

    walk("", torch.load(scratch, weights_only=False))
    return flat


@pytest.mark.slow
@pytest.mark.parametrize("engine_ranks", ["first", "all"])
def test_two_ranks_under_torchrun(workspace, finished_run, tmp_path, engine_ranks):
    """2 gloo ranks, every rank joining the sync's gathers. ``first``: the engine on rank 0 and the batch broadcast;
    the first step's update equals the 1-rank run's (same global batch). ``all``: an engine on each rank sampling
    half of the prompts (the GPU layout); the same prompts and rewards' shape, one sync per step into both."""
    run_dir = tmp_path / f"two_ranks_{engine_ranks}"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "flash_rc.backends.local", "--no-progress",
               *recipe_args(workspace, run_dir, "trainer.n_gpus_per_node=2", "trainer.total_training_steps=2",
                            f"flash_rc.train.engine_ranks={engine_ranks}")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env_for(workspace))
    assert result.returncode == 0, result.stderr[-4000:]
    one, two = records(finished_run)[0], records(run_dir)[0]
    assert [r["sync/model_version"] for r in records(run_dir)] == [1.0, 2.0]
    assert (run_dir / "global_step_2" / "rng_rank1.pt").exists()
    assert two["rollout/groups_kept"] == one["rollout/groups_kept"] == 4
    if engine_ranks == "first":
        for key in ("critic/rewards/mean", "actor/pg_loss", "actor/grad_norm", "rollout_corr/kl"):
            assert two[key] == pytest.approx(one[key], rel=1e-3, abs=1e-5), key


def test_mismatch_kl_is_zero_unquantized_and_positive_with_int8_rollouts(workspace, tmp_path):
    """The rollout/learner mismatch the TIS weights correct: ~0 when the engine computes what the learner does (an
    unquantized float32 engine, float32 learner), clearly positive with INT8 rollouts of the same weights."""
    kl = {}
    for name, overrides in (("fp32", ("actor_rollout_ref.rollout.dtype=float32",)),
                            ("int8", ("actor_rollout_ref.rollout.dtype=float32", "flash_rc.engine.precision=int8"))):
        run_dir = tmp_path / name
        result = train(workspace, run_dir, "trainer.total_training_steps=1", "trainer.test_freq=-1", *overrides)
        assert result.returncode == 0, result.stderr[-4000:]
        (record,) = records(run_dir)
        kl[name] = (record["rollout_corr/kl"], record["rollout_corr/k3_kl"])
    assert abs(kl["fp32"][0]) < 1e-4 and kl["fp32"][1] < 1e-5, kl
    assert kl["int8"][1] > 100 * max(kl["fp32"][1], 1e-8) and kl["int8"][1] > 1e-4, kl
