"""flash_rc's verl plugin registers through verl's own plugin loading, and stays light.

verl swallows plugin load errors at DEBUG level, so only registrations observed in a fresh interpreter prove that the
``verl.plugins`` entry point works: those tests run ``import verl`` in a subprocess (``-P``, neutral cwd: the
repository root must not be on ``sys.path``), once with verl's default plugin policy and once with
``VERL_USE_EXTERNAL_PLUGINS=none`` (the negative control: without the entry point nothing is registered).
"""

from __future__ import annotations

import importlib.metadata
import inspect
import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip(
    "verl.trainer.ppo.core_algos",
    reason="verl 0.9.1 is not importable here: build its env with `make verl-env`, run these with `make test-verl`",
)

from flash_rc.backends.verl import plugin  # noqa: E402

pytestmark = pytest.mark.verl

PROBE = textwrap.dedent(f"""
    import json, sys
    import verl
    after_import_verl = sorted(sys.modules)
    from verl.trainer.ppo import core_algos
    from verl.experimental.agent_loop import agent_loop
    from unittest import mock
    transfer_queue = mock.MagicMock(name="transfer_queue")  # verl[verl-core]'s TransferQueue: not installable here,
    transfer_queue.__path__, transfer_queue.__spec__ = [], None  # and verl's v1 trainer imports it at the top
    sys.modules.setdefault("transfer_queue", transfer_queue)
    from verl.trainer.ppo.v1.trainer_base import TRAINER_REGISTRY
    trainer = TRAINER_REGISTRY.get({plugin.RC_TRAINER_MODE!r})
    loss = core_algos.POLICY_LOSS_REGISTRY.get({plugin.POLICY_LOSS!r})
    estimator = core_algos.ADV_ESTIMATOR_REGISTRY.get({plugin.RC_ADV_ESTIMATOR!r})
    print(json.dumps({{
        "modules": after_import_verl,
        "loss": loss and f"{{loss.__module__}}.{{loss.__qualname__}}",
        "estimator": estimator and f"{{estimator.__module__}}.{{estimator.__qualname__}}",
        "agent_loop": agent_loop._agent_loop_registry.get({plugin.RC_AGENT_LOOP!r}),
        "builtin_agent_loops": sorted(agent_loop._agent_loop_registry),
        "trainer_mro": trainer and [f"{{c.__module__}}.{{c.__qualname__}}" for c in trainer.__mro__[:3]],
        "builtin_trainers": sorted(TRAINER_REGISTRY),
        "imported_later": sorted(m for m in sys.modules if m.startswith("flash_rc")),
    }}))
""")


def probe(tmp_path, policy: str) -> dict:
    env = {key: value for key, value in os.environ.items() if not key.startswith("VERL_USE_EXTERNAL")}
    env["VERL_USE_EXTERNAL_PLUGINS"] = policy
    result = subprocess.run([sys.executable, "-P", "-c", PROBE], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def fresh(tmp_path_factory) -> dict[str, dict]:
    """What a fresh interpreter sees, with verl's default plugin policy and with plugins off."""
    tmp_path = tmp_path_factory.mktemp("fresh")
    return {policy: probe(tmp_path, policy) for policy in ("auto", "none")}


def test_entry_point_is_declared():
    (entry,) = [e for e in importlib.metadata.entry_points(group="verl.plugins") if e.name == "flash_rc"]
    assert entry.value == plugin.__name__


def test_fresh_import_verl_registers_everything(fresh):
    seen = fresh["auto"]
    assert seen["loss"] == "flash_rc.backends.verl.loss.flash_rc_tis_loss"
    assert seen["estimator"] == "flash_rc.backends.verl.plugin.compute_rc_grpo_advantage"
    assert seen["agent_loop"] == {"_target_": "flash_rc.backends.verl.rc_agent_loop.RCAgentLoop"}
    assert {"single_turn_agent", "tool_agent"} <= set(seen["builtin_agent_loops"])  # verl's own survive
    # the RC trainer mode: verl's real sync trainer with the mixin that scopes the batch keys for the estimator
    assert seen["trainer_mro"] == ["flash_rc.backends.verl.rc_advantage.RCTrainerSync",
                                   "flash_rc.backends.verl.rc_advantage.RCAdvantageMixin",
                                   "verl.trainer.ppo.v1.trainer_sync.PPOTrainerSync"]
    assert {"sync", "colocate_async", "separate_async"} <= set(seen["builtin_trainers"])
    # The loop's module is imported only where an agent loop is built (hydra instantiates the _target_); the
    # estimator's module where verl's v1 trainer is (registering the trainer mode), which this probe did.
    assert "flash_rc.backends.verl.rc_agent_loop" not in seen["imported_later"]
    assert "flash_rc.backends.verl.rc_advantage" in seen["imported_later"]


def test_nothing_is_registered_without_the_entry_point(fresh):
    seen = fresh["none"]
    assert (seen["loss"], seen["estimator"], seen["agent_loop"], seen["trainer_mro"]) == (None, None, None, None)
    assert plugin.__name__ not in seen["modules"]


def test_the_plugin_is_light_during_import_verl(fresh):
    """The plugin adds its own module (and its parent packages) to ``import verl``, nothing else: no vLLM, and neither
    of verl's registry modules (core_algos: ~330 modules, agent_loop: ~810 more; plugin.py's docstring)."""
    with_plugin, without = set(fresh["auto"]["modules"]), set(fresh["none"]["modules"])
    assert with_plugin - without == {"flash_rc", "flash_rc.backends", "flash_rc.backends.verl", plugin.__name__}
    assert not {"vllm", plugin.CORE_ALGOS, plugin.AGENT_LOOP} & with_plugin


def test_registration_waits_for_the_module_and_runs_once(tmp_path, monkeypatch):
    """The import hook on a module of its own: nothing before the import, one call right after it ran (the module's
    code complete), none on re-import; an already imported module is registered at once."""
    package = tmp_path / "hooked_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "registry.py").write_text('"""A registry."""\nREGISTRY = {"builtin": 1}\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    calls = []
    plugin._after_import("hooked_pkg.registry", lambda module: calls.append(dict(module.REGISTRY)))
    assert calls == []
    import hooked_pkg.registry  # noqa: F401

    assert calls == [{"builtin": 1}]
    importlib.reload(hooked_pkg.registry)
    assert calls == [{"builtin": 1}]
    assert inspect.getsource(hooked_pkg.registry).startswith('"""A registry."""')  # the wrapped loader still serves
    plugin._after_import("hooked_pkg.registry", lambda module: calls.append("now"))
    assert calls == [{"builtin": 1}, "now"]
    monkeypatch.delitem(sys.modules, "hooked_pkg.registry")
    monkeypatch.delitem(sys.modules, "hooked_pkg")


def test_estimator_forwards_verls_call_to_the_rc_module(monkeypatch):
    """verl calls ``fn(token_level_rewards=, response_mask=, config=, index=, **extra)``; the registered function passes
    exactly that on to ``rc_advantage.compute_rc_grpo_advantage`` and returns its (advantages, returns)."""
    from verl.trainer.ppo import core_algos

    from flash_rc.backends.verl import rc_advantage

    calls = []

    def recorder(**kwargs):
        calls.append(kwargs)
        return "advantages", "returns"

    monkeypatch.setattr(rc_advantage, "compute_rc_grpo_advantage", recorder)
    estimator = core_algos.get_adv_estimator_fn(plugin.RC_ADV_ESTIMATOR)
    result = estimator(token_level_rewards="rewards", response_mask="mask", config="algo", index="uids",
                       reward_baselines="baselines")  # fmt: skip
    assert result == ("advantages", "returns")
    assert calls == [{"token_level_rewards": "rewards", "response_mask": "mask", "config": "algo", "index": "uids",
                      "reward_baselines": "baselines"}]  # fmt: skip


def test_agent_loop_target_is_an_agent_loop():
    """What verl's agent-loop worker instantiates by the registered ``_target_`` is an ``AgentLoopBase``."""
    pytest.importorskip(plugin.RC_AGENT_LOOP_TARGET.rpartition(".")[0],
                        reason="helper R's rc_agent_loop module is not in this tree yet")  # fmt: skip
    import hydra.utils
    from verl.experimental.agent_loop.agent_loop import AgentLoopBase, _agent_loop_registry

    target = _agent_loop_registry[plugin.RC_AGENT_LOOP]["_target_"]
    assert issubclass(hydra.utils.get_class(target), AgentLoopBase)
