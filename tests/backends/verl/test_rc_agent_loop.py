"""RCAgentLoop (verl 0.9.1's AgentLoopBase) running full RC chains, and its per-(problem, state) GRPO advantages.

What is real: verl's ``AgentLoopBase`` / ``AgentLoopOutput`` / ``TokenOutput`` / ``CheckpointCallback`` and its
Continuous-Token prompt builder on the tiny Qwen2 tokenizer, flash_rc's RC core (scheduler, states, replay buffer),
the reward router's GSM8K scorer in its process pool, verl's ``compute_grpo_outcome_advantage`` as the reference.
What is replaced: the LLM server — a fake ``server_manager`` that answers from the request id (a reasoning turn says
``#### 7`` or ``#### 8``, a summary names its chain and cycle), with log-probs ``-(i+1)/100`` and every call recorded;
and verl's ``AgentLoopWorkerTQ._run_prompt``, mirrored here (``rollout.n`` session tasks created in one loop, then
awaited), because that module imports ``transfer_queue``, which does not install here.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

pytest.importorskip(
    "verl.experimental.agent_loop.agent_loop",
    reason="verl 0.9.1 is not importable here: build its env with `make verl-env`, run these with `make test-verl`",
)

from omegaconf import OmegaConf  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402
from verl.experimental.agent_loop.agent_loop import DictConfigWrap  # noqa: E402
from verl.trainer.ppo.core_algos import compute_grpo_outcome_advantage  # noqa: E402
from verl.utils.dataset.rl_dataset import RLHFDataset  # noqa: E402
from verl.workers.rollout.replica import TokenOutput  # noqa: E402

from flash_rc.backends.verl import rc_agent_loop  # noqa: E402
from flash_rc.backends.verl.rc_advantage import (  # noqa: E402
    RC_REPLAY_CALLBACK,
    RCAdvantageMixin,
    check_rc_settings,
    compute_rc_grpo_advantage,
    rc_group_ids,
    rc_turn_groups,
)
from flash_rc.backends.verl.rc_agent_loop import REPLAY_FILE, RCAgentLoop, RCReplayCheckpoint  # noqa: E402
from flash_rc.errors import ConfigError  # noqa: E402
from flash_rc.models import resolve_model  # noqa: E402
from flash_rc.rc.prompts import REASONING_PROMPT  # noqa: E402
from flash_rc.rc.replay import ReplayConfig, SummaryReplayBuffer  # noqa: E402

pytestmark = pytest.mark.verl
H_R, H_S = 24, 16
PROBLEMS = {
    "uid-a": ("Tom has 3 apples and buys 4 more. How many?", "7"),
    "uid-b": ("A box holds 2 rows of 4 pens. How many pens?", "8"),
}


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(resolve_model("tiny-qwen2"))


def summary(uid: str, cycle: int, start: int) -> str:
    """The fake's summary of ``uid``'s chain after ``cycle`` (a chain started at depth ``start``); < H_S tokens."""
    return f"Sum{uid[-1]}{cycle}@{start}"


class FakeServer:
    """verl's server manager, answering from the request id; records every call."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.calls: list[dict] = []

    def text(self, request_id: str) -> str:
        fields = request_id.split("|")
        if "summarization" in fields:  # {uid}|0|summarization|{n}|{start}
            return summary(fields[0], int(fields[3]), int(fields[4]))
        if "train" in fields:  # {uid}|0|{state}|train|{sample}: even samples right, odd wrong
            right = PROBLEMS[fields[0]][1]
            answer = right if int(fields[4]) % 2 == 0 else str(int(right) + 1)
            return f"Trained turn {fields[2]}.{fields[4]}. #### {answer}"
        return f"Online reasoning {fields[3]}. #### {PROBLEMS[fields[0]][1]}"  # {uid}|0|reasoning|{n}|{start}

    async def generate(self, request_id, prompt_ids, sampling_params, **kwargs):
        self.calls.append({"request_id": request_id, "prompt_ids": list(prompt_ids), **sampling_params})
        await asyncio.sleep(0)
        ids = self.tokenizer.encode(self.text(request_id))[: sampling_params["max_tokens"]]
        return TokenOutput(
            token_ids=ids,
            log_probs=[-(i + 1) / 100 for i in range(len(ids))],
            stop_reason="completed",
            extra_fields={"global_steps": 5, "min_global_steps": 5, "max_global_steps": 5},
        )


def make_config(tmp_path, n=4, callback=RC_REPLAY_CALLBACK, **rc):
    rc = {
        "enable": True,
        "t_train": 3,
        "n_summ": 2,
        "k": 2,
        "max_thinking_tokens": H_R,
        "max_summary_tokens": H_S,
        **rc,
    }
    return OmegaConf.create(
        {
            "actor_rollout_ref": {"rollout": {"n": n, "prompt_length": 512, "response_length": 32}},
            "data": {"apply_chat_template_kwargs": {}},
            "algorithm": {"adv_estimator": "flash_rc_rc_grpo", "norm_adv_by_std_in_grpo": True},
            "trainer": {
                "v1": {"trainer_mode": "flash_rc_rc"},
                "checkpoint_callback_class": callback,
                "resume_mode": "auto",
                "default_local_dir": str(tmp_path / "ckpt"),
            },
            "flash_rc": {"rc": rc},
        }
    )


def agent_loop(config, tokenizer, server):
    """The loop as verl's agent-loop worker builds it (hydra instantiates the registered target with these)."""
    return RCAgentLoop(trainer_config=DictConfigWrap(config), server_manager=server, tokenizer=tokenizer,
                       processor=None, dataset_cls=RLHFDataset, data_config=DictConfigWrap(config.data),
                       hf_model_type="qwen2")  # fmt: skip


def run_step(config, tokenizer, server, step=1, uids=tuple(PROBLEMS)):
    """Every session of every prompt, as verl's ``_run_prompt`` starts them: {uid: [output of session 0..n-1]}."""
    sampling = {"temperature": 1.0, "top_p": 1.0, "top_k": -1, "repetition_penalty": 1.0, "logprobs": True}

    def session(uid, session_id):
        problem, answer = PROBLEMS[uid]
        loop = agent_loop(config, tokenizer, server)
        return loop.run(
            dict(sampling),
            uid=uid,
            session_id=session_id,
            global_steps=step,
            data_source="openai/gsm8k",
            raw_prompt=[{"role": "user", "content": problem}],
            extra_info={"question": problem},
            reward_model={"ground_truth": answer},
        )

    async def main():
        tasks = {
            uid: [asyncio.create_task(session(uid, s)) for s in range(config.actor_rollout_ref.rollout.n)]
            for uid in uids
        }
        return {uid: list(await asyncio.gather(*group)) for uid, group in tasks.items()}

    return asyncio.run(main())


def reasoning_ids(tokenizer, problem, context):
    messages = [{"role": "user", "content": REASONING_PROMPT.format(problem=problem, curr_summary=context)}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]


def test_full_chains_return_the_trained_turns(tmp_path, tokenizer):
    server = FakeServer(tokenizer)
    outputs = run_step(make_config(tmp_path), tokenizer, server)
    for uid, (problem, answer) in PROBLEMS.items():
        online = [c for c in server.calls if c["request_id"].startswith(f"{uid}|0|") and "train" not in c["request_id"]]
        # one shared chain per problem: T_train = 3 cycles of reason (H_R) -> summarize (H_S), never re-run per session
        assert [c["request_id"].split("|")[2] for c in online] == ["reasoning", "summarization"] * 3
        assert [c["max_tokens"] for c in online] == [H_R, H_S] * 3
        summaries = ["", *(summary(uid, n, 0) for n in (1, 2, 3))]
        assert online[2]["prompt_ids"] == reasoning_ids(tokenizer, problem, summaries[1])  # cycle 2 reads summary 1
        got = outputs[uid]
        assert len(got) == 2 * 2  # N_summ x K
        states = [o.extra_fields["rc"]["state_index"] for o in got]
        assert states[0] == states[1] != states[2] == states[3]  # sessions 0,1 -> state 0; 2,3 -> state 1
        assert set(states) <= {0, 1, 2}
        for session, output in enumerate(got):
            meta = output.extra_fields["rc"]
            j = meta["state_index"]
            # the prompt is I_R(problem, context_j): the summary after cycle j ("" for j = 0)
            assert output.prompt_ids == reasoning_ids(tokenizer, problem, summaries[j])
            call = next(c for c in server.calls if c["request_id"] == f"{uid}|0|{j}|train|{session % 2}")
            assert call["max_tokens"] == H_R and call["temperature"] == 1.0 and call["logprobs"] is True
            assert call["prompt_ids"] == output.prompt_ids
            text = tokenizer.decode(output.response_ids)
            assert text.startswith(f"Trained turn {j}.{session % 2}.") and "Sum" not in text  # never a summary
            n = len(output.response_ids)
            assert output.response_mask == [1] * n
            assert output.response_logprobs == pytest.approx([-(i + 1) / 100 for i in range(n)])
            assert output.reward_score == (1.0 if session % 2 == 0 else 0.0)  # its own answer, not the last turn's
            assert output.extra_fields["reward_extra_info"]["acc"] == output.reward_score
            assert output.extra_fields["max_global_steps"] == 5  # verl's staleness tags survive
            assert meta | {"problem_key": None} == {
                "problem_key": None,
                "state_index": j,
                "depth": j,
                "starting_step": 0,
                "turn_type": "reasoning",
                "cycle_step": 2 * j,
                "turn_number": j + 1,
                "sample": session % 2,
                "group": f"{uid}|{session // 2}",
                "model_version": 5,
            }
    trained = [c for c in server.calls if "|train|" in c["request_id"]]
    assert len(trained) == len(PROBLEMS) * 4 and len(server.calls) == len(PROBLEMS) * (6 + 4)
    assert not rc_agent_loop._ONLINE  # every shared chain is released once it ended


def test_advantages_group_per_problem_and_state(tmp_path, tokenizer):
    outputs = run_step(make_config(tmp_path, n=6, n_summ=2, k=3), tokenizer, FakeServer(tokenizer))
    keys, uids, rewards = [], [], []
    for uid, got in outputs.items():
        for session, output in enumerate(got):
            keys.append(f"{uid}_{session}_0")
            uids.append(uid)
            rewards.append(output.reward_score)
    assert rewards == [1.0, 0.0, 1.0] * 4  # samples 0, 2 right, 1 wrong in every state
    lengths = torch.tensor([len(o.response_ids) for got in outputs.values() for o in got])
    mask = (torch.arange(32)[None, :] < lengths[:, None]).long()
    token_rewards = torch.zeros(len(keys), 32)
    token_rewards[torch.arange(len(keys)), lengths - 1] = torch.tensor(rewards)
    with rc_turn_groups(keys, k=3):
        advantages, returns = compute_rc_grpo_advantage(
            token_rewards, mask, make_config(tmp_path).algorithm, index=uids
        )
    # per state [1, 0, 1]: mean 2/3, unbiased std sqrt(1/3) = 0.57735 -> 1: (1/3)/0.57735 = 0.57735, 0: -1.1547
    expected = torch.tensor([0.57735, -1.1547, 0.57735] * 4)
    assert advantages[:, 0] == pytest.approx(expected, abs=1e-4)
    assert torch.equal(advantages, returns) and torch.all(advantages[mask == 0] == 0)
    verl_grouped, _ = compute_grpo_outcome_advantage(token_rewards, mask, index=rc_group_ids(keys, 3))
    assert torch.allclose(advantages, verl_grouped, atol=1e-6)  # verl's own GRPO, fed our groups
    per_problem, _ = compute_grpo_outcome_advantage(token_rewards, mask, index=uids)
    assert not torch.allclose(per_problem[:2], advantages[:2])  # what grouping by verl's uid alone would give


def test_advantage_groups_by_hand_and_refusals(tmp_path):
    # two states of one problem (K = 2), plus a verl padding row: rewards [1, 0 | 1, 1 | 0]
    keys = ["u_0_0", "u_1_0", "u_2_0", "u_3_0", "padff_0_0"]
    rewards = torch.tensor([[0.0, 1.0], [0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    mask = torch.tensor([[1, 1], [1, 1], [1, 0], [1, 1], [0, 0]])
    index = ["u", "u", "u", "u", "padff"]
    config = OmegaConf.create({"norm_adv_by_std_in_grpo": False})  # Dr. GRPO: R - mean
    with rc_turn_groups(keys, k=2):
        advantages, _ = compute_rc_grpo_advantage(rewards, mask, config, index=index)
    # state 0: mean 0.5 -> +0.5, -0.5; state 1: mean 1 -> 0, 0; the padding row: masked out
    assert advantages.tolist() == [[0.5, 0.5], [-0.5, -0.5], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]]
    with pytest.raises(ConfigError, match="trainer.v1.trainer_mode=flash_rc_rc"):
        compute_rc_grpo_advantage(rewards, mask, config, index=index)  # no keys in scope: refuse, never per problem
    with rc_turn_groups(keys, k=2), pytest.raises(ValueError, match="row 1 has uid 'v'"):
        compute_rc_grpo_advantage(rewards, mask, config, index=["u", "v", "u", "u", "padff"])
    with pytest.raises(ValueError, match="one trained turn per session"):
        rc_group_ids(["u_0_1"], k=2)


def test_trainer_mixin_scopes_the_batch_keys(tmp_path):
    """The mixin around a stand-in for verl's ``_compute_advantage``, which calls a registered estimator as
    ``ray_trainer.compute_advantage`` does: ``fn(token_level_rewards=, response_mask=, config=, index=uid)``."""

    class VerlTrainerStandIn:
        def _compute_advantage(self, batch, metrics):
            rewards = torch.tensor([[1.0], [0.0], [0.0], [0.0]])
            return compute_rc_grpo_advantage(
                token_level_rewards=rewards,
                response_mask=torch.ones(4, 1),
                config=self.config.algorithm,
                index=["u"] * 4,
            )[0]

    class Trainer(RCAdvantageMixin, VerlTrainerStandIn):
        config = make_config(tmp_path)

    batch = type("KVBatchMeta", (), {"keys": ["u_0_0", "u_1_0", "u_2_0", "u_3_0"]})()
    advantages = Trainer()._compute_advantage(batch, {})
    assert advantages[:, 0].tolist() == pytest.approx([0.7071, -0.7071, 0.0, 0.0], abs=1e-4)  # [1,0] | [0,0]


def test_replay_buffer_is_consulted_updated_and_survives_save_and_load(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setattr(rc_agent_loop, "_LOCAL_HOST", None)
    config = make_config(tmp_path, replay={"enable": True})
    callback = RCReplayCheckpoint(config)  # verl builds it at trainer start: the buffer starts empty
    server = FakeServer(tokenizer)
    run_step(config, tokenizer, server, step=1, uids=("uid-a",))
    key = rc_agent_loop.problem_key("openai/gsm8k", PROBLEMS["uid-a"][0])
    entries = callback.host.buffer.entries(key)
    assert [(e.text, e.starting_step) for e in entries] == [(summary("uid-a", n, 0), n) for n in (1, 2, 3)]
    folder = tmp_path / "ckpt" / "global_step_1"
    callback.on_save(trainer=None, global_step=1, checkpoint_dir=str(folder))
    assert (folder / REPLAY_FILE).is_file()
    (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").write_text("1")

    monkeypatch.setattr(rc_agent_loop, "_LOCAL_HOST", None)  # a fresh run resuming from global_step_1
    resumed = RCReplayCheckpoint(config)
    assert resumed.host.resumed_from == str(folder / REPLAY_FILE)
    assert resumed.host.buffer.entries(key) == entries
    reference = SummaryReplayBuffer(ReplayConfig(enable=True), seed=0)
    reference.load(folder / REPLAY_FILE)
    (start,) = reference.sample(key)  # the entry the resumed buffer must draw (its RNG state was saved too)
    server = FakeServer(tokenizer)
    outputs = run_step(config, tokenizer, server, step=2, uids=("uid-a",))
    first = server.calls[0]
    assert first["request_id"] == f"uid-a|0|reasoning|1|{start.starting_step}"  # the chain resumes at its depth
    assert first["prompt_ids"] == reasoning_ids(tokenizer, PROBLEMS["uid-a"][0], start.text)
    for output in outputs["uid-a"]:
        meta = output.extra_fields["rc"]
        assert meta["starting_step"] == start.starting_step
        assert meta["depth"] == start.starting_step + meta["state_index"]
    # purge_on_add: only the new chain's summaries, each one cycle deeper
    assert [e.starting_step for e in resumed.host.buffer.entries(key)] == [start.starting_step + n for n in (1, 2, 3)]


def test_replay_without_the_checkpoint_callback_is_refused(tmp_path, tokenizer, monkeypatch):
    assert RC_REPLAY_CALLBACK == f"{RCReplayCheckpoint.__module__}.{RCReplayCheckpoint.__qualname__}"
    with pytest.raises(ConfigError, match="trainer.checkpoint_callback_class=None: the replay buffer needs"):
        check_rc_settings(make_config(tmp_path, callback=None, replay={"enable": True}))
    monkeypatch.setattr(rc_agent_loop, "_LOCAL_HOST", None)  # configured, but no buffer was started: refused too
    with pytest.raises(ConfigError, match="no replay buffer was started"):
        run_step(make_config(tmp_path, replay={"enable": True}), tokenizer, FakeServer(tokenizer), uids=("uid-a",))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"rc": {"k": 1}, "n": 2}, "flash_rc.rc.k=1: GRPO per state needs K >= 2"),
        ({"n": 8}, "actor_rollout_ref.rollout.n=8 must be flash_rc.rc.n_summ * k = 4"),
        ({"rc": {"n_summ": 4}}, "n_summ=4 states per chain, but a chain of t_train=3"),
        ({"rc": {"max_thinking_tokens": 64}}, "response_length=32 is below flash_rc.rc.max_thinking_tokens=64"),
        ({"rc": {"replay": {"enable": True, "sample_per_problem": 2}}}, "sample_per_problem=2"),
        ({"rc": {"enable": False}}, "flash_rc.rc.enable is false"),
        ({"rc": {"t_trian": 2}}, "t_trian"),
        ({"estimator": "grpo"}, "algorithm.adv_estimator=grpo groups all turns of a problem together"),
    ],
)
def test_bad_config_fails_in_one_line(tmp_path, tokenizer, overrides, message):
    config = make_config(tmp_path, n=overrides.get("n", 4), **overrides.get("rc", {}))
    if "estimator" in overrides:
        config.algorithm.adv_estimator = overrides["estimator"]
    with pytest.raises(ConfigError) as error:
        check_rc_settings(config)
    assert message in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(ConfigError, match=message.replace("*", r"\*").replace(".", r"\.")):  # also at the loop's start
        agent_loop(config, tokenizer, None)


def test_missing_rc_section_is_refused():
    with pytest.raises(ConfigError, match="flash_rc.rc is missing"):
        check_rc_settings(OmegaConf.create({"actor_rollout_ref": {"rollout": {"n": 4}}}))


def test_prompt_over_prompt_length_fails_the_problem(tmp_path, tokenizer):
    config = make_config(tmp_path)
    config.actor_rollout_ref.rollout.prompt_length = 40
    with pytest.raises(RuntimeError, match="over actor_rollout_ref.rollout.prompt_length=40"):
        run_step(config, tokenizer, FakeServer(tokenizer), uids=("uid-a",))
    assert not rc_agent_loop._ONLINE


def test_module_docstring_names_the_verl_keys():
    doc = rc_agent_loop.__doc__ + Path(rc_agent_loop.__file__).with_name("rc_advantage.py").read_text()
    for key in (
        "actor_rollout_ref.rollout.agent.default_agent_loop=flash_rc_rc",
        "algorithm.adv_estimator=flash_rc_rc_grpo",
        "trainer.v1.trainer_mode=flash_rc_rc",
        "flash_rc.rc",
    ):
        assert key in doc


def test_replay_buffer_in_the_named_ray_actor(tmp_path, tokenizer, monkeypatch):
    """The production path: agent loops in any Ray worker share one named actor; saved and resumed through it."""
    ray = pytest.importorskip("ray")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        config = make_config(tmp_path, replay={"enable": True})
        callback = RCReplayCheckpoint(config)
        assert rc_agent_loop.replay_host()._actor_id == callback.host._actor_id  # found by name
        run_step(config, tokenizer, FakeServer(tokenizer), step=1, uids=("uid-a",))
        key = rc_agent_loop.problem_key("openai/gsm8k", PROBLEMS["uid-a"][0])
        folder = tmp_path / "ckpt" / "global_step_1"
        callback.on_save(trainer=None, global_step=1, checkpoint_dir=str(folder))
        saved = SummaryReplayBuffer(ReplayConfig(enable=True))
        saved.load(folder / REPLAY_FILE)
        assert [(e.text, e.starting_step) for e in saved.entries(key)] == [
            (summary("uid-a", n, 0), n) for n in (1, 2, 3)
        ]
        (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").write_text("1")
        ray.kill(callback.host)  # the run ends; a new one resumes from global_step_1
        resumed = RCReplayCheckpoint(config)
        assert ray.get(resumed.host.sample.remote(key))[0].text in {e.text for e in saved.entries(key)}
    finally:
        ray.shutdown()
