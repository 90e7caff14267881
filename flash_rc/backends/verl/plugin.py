"""flash_rc's verl plugin: registers our policy loss, RC agent loop, RC advantage estimator and RC trainer mode.

How it is loaded. ``pyproject.toml`` declares this module under verl's ``verl.plugins`` entry-point group, and every
``import verl`` loads that group (unless ``VERL_USE_EXTERNAL_PLUGINS=none``) — in the driver, the trainer, the FSDP
workers, the agent-loop workers and the vLLM worker processes alike, which is what a registry entry needs: a
registration only exists in the process that made it. ``VERL_USE_EXTERNAL_MODULES=flash_rc.backends.verl.plugin``
loads it too where entry points are off.

Why the registrations are deferred. verl loads plugins *during* ``verl/__init__``, and verl's registries live in heavy
modules: ``verl.trainer.ppo.core_algos`` (policy losses, advantage estimators; importing it adds ~330 modules and
~0.7 s to a bare ``import verl``: transformers, accelerate) and ``verl.experimental.agent_loop.agent_loop`` (agent
loops; another ~810 modules and ~1 s: pandas, datasets, hydra, fastapi), measured on the 2-core CPU VM. Importing
them here would make every verl process pay for them (a vLLM worker never builds an agent loop), and would run them
while ``verl`` is itself half-imported. verl has no lazy registration hook of its own for losses or estimators (its
agent-loop YAML, ``rollout.agent.agent_loop_config_path``, would need a file in every recipe), so this module
installs one small import hook instead: each registration runs right after verl executes the registry module it
writes into, in whichever process imports it, before any code can look a name up (lookups happen in verl's
functions, called later). If a registry module is already imported, its registration runs at once. Nothing of vLLM
and nothing of verl beyond what ``import verl`` already loaded is imported here; the test suite checks both in a
fresh interpreter.

What is registered:

- policy loss :data:`POLICY_LOSS` → :func:`flash_rc.backends.verl.loss.flash_rc_tis_loss` (PPO-clip × TIS through
  ``flash_rc.kernels.fused_tis_loss``);
- agent loop :data:`RC_AGENT_LOOP` → the FQN of ``flash_rc.backends.verl.rc_agent_loop.RCAgentLoop`` (verl's registry
  stores a hydra ``_target_``, so that module is imported only where an agent loop is built);
- advantage estimator :data:`RC_ADV_ESTIMATOR` → :func:`compute_rc_grpo_advantage`, which imports
  ``flash_rc.backends.verl.rc_advantage`` on its first call (in the trainer process);
- v1 trainer mode :data:`RC_TRAINER_MODE` → verl's ``PPOTrainerSync`` with the batch keys the estimator groups by
  (``rc_advantage.register_rc_trainer``), right after ``verl.trainer.ppo.v1.trainer_sync`` has executed (in verl's
  TaskRunner, before it looks the mode up).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from collections.abc import Callable
from types import ModuleType

POLICY_LOSS = "flash_rc_tis"
"""``actor_rollout_ref.actor.policy_loss.loss_mode``: PPO-clip x token TIS through flash_rc's fused kernel."""
RC_AGENT_LOOP = "flash_rc_rc"
"""``actor_rollout_ref.rollout.agent.default_agent_loop`` (or a row's ``agent_name``): the RC agent loop."""
RC_ADV_ESTIMATOR = "flash_rc_rc_grpo"
"""``algorithm.adv_estimator``: GRPO grouped per (problem, summary) state of RC training."""

RC_TRAINER_MODE = "flash_rc_rc"
"""``trainer.v1.trainer_mode`` of RC training: verl's sync trainer with the per-(problem, state) advantage groups."""
RC_REPLAY_CALLBACK = "flash_rc.backends.verl.rc_agent_loop.RCReplayCheckpoint"
"""``trainer.checkpoint_callback_class`` of RC training with the replay buffer: starts, resumes and saves it."""

RC_AGENT_LOOP_TARGET = "flash_rc.backends.verl.rc_agent_loop.RCAgentLoop"
"""What verl's agent-loop registry stores for :data:`RC_AGENT_LOOP` (hydra instantiates it in the agent-loop worker)."""

CORE_ALGOS = "verl.trainer.ppo.core_algos"
AGENT_LOOP = "verl.experimental.agent_loop.agent_loop"
TRAINER_SYNC = "verl.trainer.ppo.v1.trainer_sync"


def compute_rc_grpo_advantage(token_level_rewards, response_mask, config=None, index=None, **kwargs):
    """verl's advantage-estimator signature (``-> (advantages, returns)``), calling
    ``flash_rc.backends.verl.rc_advantage.compute_rc_grpo_advantage``; imported here on the first call, in the
    trainer process, so the plugin stays light everywhere else."""
    from flash_rc.backends.verl.rc_advantage import compute_rc_grpo_advantage as compute

    return compute(token_level_rewards=token_level_rewards, response_mask=response_mask, config=config, index=index,
                   **kwargs)  # fmt: skip


def _register_losses_and_estimators(core_algos: ModuleType) -> None:
    from flash_rc.backends.verl.loss import flash_rc_tis_loss

    core_algos.register_policy_loss(POLICY_LOSS)(flash_rc_tis_loss)
    core_algos.register_adv_est(RC_ADV_ESTIMATOR)(compute_rc_grpo_advantage)


def _register_agent_loop(agent_loop: ModuleType) -> None:
    # What verl's own @register(name) decorator stores, without importing the class here.
    agent_loop._agent_loop_registry[RC_AGENT_LOOP] = {"_target_": RC_AGENT_LOOP_TARGET}


def _register_rc_trainer(trainer_sync: ModuleType) -> None:
    from flash_rc.backends.verl.rc_advantage import register_rc_trainer

    register_rc_trainer()


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Runs a registration right after a given module has been executed, the first time it is imported.

    It finds nothing itself: for a watched name it asks the regular path finder for the module's spec (verl's registry
    modules are plain submodules, found on their parent package's ``__path__``) and wraps the spec's loader.
    """

    def __init__(self) -> None:
        self.pending: dict[str, Callable[[ModuleType], None]] = {}

    def find_spec(self, fullname, path, target=None):
        register = self.pending.pop(fullname, None)
        if register is None:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        if spec is not None and spec.loader is not None:
            spec.loader = _ThenRegister(spec.loader, register)
        return spec


class _ThenRegister(importlib.abc.Loader):
    """A module's own loader, then the registration (any other loader attribute is the wrapped loader's)."""

    def __init__(self, loader: importlib.abc.Loader, register: Callable[[ModuleType], None]) -> None:
        self._loader = loader
        self._register = register

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        self._register(module)

    def __getattr__(self, name):
        return getattr(self._loader, name)


def _after_import(module_name: str, register: Callable[[ModuleType], None]) -> None:
    """Run ``register(module)`` now if the module is imported, else right after its first import."""
    module = sys.modules.get(module_name)
    if module is not None:
        register(module)
        return
    finder = next((f for f in sys.meta_path if isinstance(f, _RegisterAfterImport)), None)
    if finder is None:
        finder = _RegisterAfterImport()
        sys.meta_path.insert(0, finder)
    finder.pending[module_name] = register


_after_import(CORE_ALGOS, _register_losses_and_estimators)
_after_import(AGENT_LOOP, _register_agent_loop)
_after_import(TRAINER_SYNC, _register_rc_trainer)
