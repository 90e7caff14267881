"""flash_rc's verl plugin: the names it registers with verl 0.9.1 (loaded through the ``verl.plugins`` entry point).

The registrations themselves follow in the next commit; the names are fixed now because recipes and the other plugin
modules refer to them.
"""

POLICY_LOSS = "flash_rc_tis"
"""``actor_rollout_ref.actor.policy_loss.loss_mode``: PPO-clip x token TIS through flash_rc's fused kernel."""
RC_AGENT_LOOP = "flash_rc_rc"
"""``actor_rollout_ref.rollout.agent.default_agent_loop`` (or a row's ``agent_name``): the Reasoning Cache agent loop."""
RC_ADV_ESTIMATOR = "flash_rc_rc_grpo"
"""``algorithm.adv_estimator``: GRPO grouped per (problem, summary) state of RC training."""
