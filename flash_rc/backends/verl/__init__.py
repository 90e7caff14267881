"""flash_rc's plugin for unforked verl 0.9.1: the same core (``flash_rc.algo``, ``flash_rc.kernels``, ``flash_rc.rc``,
``flash_rc.rollout``) behind verl's own extension points, so a verl + Ray cluster runs flash_rc's algorithm.

- ``plugin``: loaded by every ``import verl`` through the ``verl.plugins`` entry point; registers the names below in
  verl's registries (deferred until verl imports each registry module, so ``import verl`` stays light).
- ``loss``: the ``flash_rc_tis`` policy loss (``actor.policy_loss.loss_mode``): PPO-clip x verl's rollout IS weights
  through the fused TIS kernel, equal to verl's ``vanilla`` loss on the same inputs.
- ``worker_ext``: the INT8 / FP8 vLLM worker extensions (``rollout.engine_kwargs.vllm``): every weight sync
  requantized with frozen or refreshed scales and update-visibility metrics; ``vllm_engine_kwargs(precision)``.
- ``rc_agent_loop`` / ``rc_advantage``: the Reasoning Cache agent loop (``flash_rc_rc``), its per-state GRPO
  advantage estimator (``flash_rc_rc_grpo``), the v1 trainer mode that hands the estimator each row's state
  (``flash_rc_rc``) and the replay buffer's checkpoint callback (``RCReplayCheckpoint``).
- ``config`` / ``main``: the launcher: the ``flash_rc:`` section written into verl's keys, every check before Ray,
  and ``python -m flash_rc.backends.verl.main``.
"""
