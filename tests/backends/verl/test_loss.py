"""The ``flash_rc_tis`` policy loss against verl 0.9.1's own code on the same inputs.

Three computations of one number, which must agree (loss and d loss / d log_prob, float32, ~1e-6):

1. verl's stock path: ``rollout_corr_helper.compute_rollout_correction_and_rejection_mask`` (what verl's trainer runs
   on the driver: token TIS at threshold C) → ``core_algos.compute_policy_loss_vanilla`` fed those weights;
2. our registered loss, looked up in verl's registry and fed the same weights;
3. flash_rc's reference, ``flash_rc.algo.losses.tis_policy_loss``, fed the *rollout log-probs* and C.

Inputs are random with padding (ragged rows, one fully masked row, finite garbage in the padding), over several seeds,
every aggregation mode, DAPO's asymmetric + dual clip, and data-parallel global batch info. Each case is checked to
exercise truncation (some w = C) and every clip branch, so agreement is not agreement on a trivial case. The end-to-end
test goes through verl's real call site, ``verl/workers/utils/losses.py::ppo_loss``, on an unpadded model output.
"""

from __future__ import annotations

import functools

import pytest
import torch

pytest.importorskip(
    "verl.trainer.ppo.core_algos",
    reason="verl 0.9.1 is not importable here: build its env with `make verl-env`, run these with `make test-verl`",
)

from verl.trainer.ppo import core_algos  # noqa: E402
from verl.trainer.ppo.rollout_corr_helper import compute_rollout_correction_and_rejection_mask  # noqa: E402
from verl.workers.config import ActorConfig, PolicyLossConfig  # noqa: E402

from flash_rc.algo import losses as reference  # noqa: E402
from flash_rc.algo.rollout_correction import RolloutCorrectionConfig  # noqa: E402
from flash_rc.backends.verl import loss as verl_loss  # noqa: E402
from flash_rc.backends.verl.plugin import POLICY_LOSS  # noqa: E402

pytestmark = pytest.mark.verl

SEEDS = (0, 1, 2)
AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "token-sum", "seq-mean-token-sum-norm")
CLIPS = {  # verl ActorConfig keys
    "ppo": {"clip_ratio": 0.2, "clip_ratio_c": 3.0},
    "dapo": {"clip_ratio_low": 0.2, "clip_ratio_high": 0.28, "clip_ratio_c": 10.0},
}
THRESHOLD = 2.0  # TIS C (Flash RL's GSM8K setting)
LOSS_TOL = {"rtol": 5e-6, "atol": 1e-6}  # float32 sums of ~100 terms, plus the weight round trip (loss.py)
GRAD_TOL = {"rtol": 1e-5, "atol": 1e-8}  # per-token gradients are ~1/N_tok = 1e-2; ~1e-7 relative is float32 noise


def actor_config(clip: str = "ppo", loss_mode: str = POLICY_LOSS, **global_batch_info) -> ActorConfig:
    """verl's real ActorConfig (its __post_init__ checks run), with what ``ppo_loss`` sets in global_batch_info."""
    config = ActorConfig(strategy="fsdp", rollout_n=4, ppo_mini_batch_size=8, ppo_micro_batch_size_per_gpu=4,
                         policy_loss=PolicyLossConfig(loss_mode=loss_mode), **CLIPS[clip])  # fmt: skip
    config.global_batch_info.update(global_batch_info)
    return config


def random_batch(seed: int, batch: int = 8, length: int = 24) -> dict[str, torch.Tensor]:
    """Padded [B, T] inputs like verl's: ragged right padding (row 0 full, row 1 empty), finite garbage in the padding,
    log-prob spreads wide enough that truncation (δ > log 2), clipping (|log r| > 0.2) and dual clip (r > c, A < 0)
    all occur."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator)

    lengths = torch.randint(1, length + 1, (batch,), generator=generator)
    lengths[0], lengths[1] = length, 0
    mask = torch.arange(length) < lengths[:, None]
    old = -4.0 * torch.rand(batch, length, generator=generator)
    rollout = old + 0.5 * randn(batch, length)
    jumps = 2.5 * (torch.rand(batch, length, generator=generator) < 0.1)  # r ≈ 12: past DAPO's dual clip c = 10
    log_prob = old + 0.6 * randn(batch, length) + jumps
    advantages = (2.0 * randn(batch, 1)).expand(batch, length).clone()  # one outcome advantage per sequence
    garbage = ~mask
    for tensor in (old, rollout, log_prob, advantages):
        tensor[garbage] = 50.0 * randn(int(garbage.sum()))
    return {"old": old, "rollout": rollout, "log_prob": log_prob, "advantages": advantages, "mask": mask}


def verl_weights(inputs, rollout_is: str = "token", threshold: float | str = THRESHOLD) -> torch.Tensor:
    """The IS weights verl's trainer computes on the driver and hands the loss as ``rollout_is_weights``."""
    weights, _, _ = compute_rollout_correction_and_rejection_mask(
        old_log_prob=inputs["old"], rollout_log_prob=inputs["rollout"], response_mask=inputs["mask"].float(),
        rollout_is=rollout_is, rollout_is_threshold=threshold)  # fmt: skip
    return weights.batch["rollout_is_weights"]


def run(loss_fn, inputs, config, weights, agg_mode):
    """(loss, d loss / d log_prob, metrics) of a verl-signature policy loss."""
    log_prob = inputs["log_prob"].clone().requires_grad_()
    loss, metrics = loss_fn(old_log_prob=inputs["old"], log_prob=log_prob, advantages=inputs["advantages"],
                            response_mask=inputs["mask"], loss_agg_mode=agg_mode, config=config,
                            rollout_is_weights=weights)  # fmt: skip
    (grad,) = torch.autograd.grad(loss, log_prob)
    return loss.detach(), grad, metrics


def reference_loss(inputs, clip, agg_mode, correction, **global_batch_info):
    """flash_rc.algo's reference on the rollout log-probs (not on verl's weights)."""
    log_prob = inputs["log_prob"].clone().requires_grad_()
    settings = CLIPS[clip]
    loss_config = reference.PolicyLossConfig(
        clip_ratio_low=settings.get("clip_ratio_low", settings.get("clip_ratio")),
        clip_ratio_high=settings.get("clip_ratio_high", settings.get("clip_ratio")),
        clip_ratio_c=settings["clip_ratio_c"], loss_agg_mode=agg_mode)  # fmt: skip
    batch = reference.PolicyLossInputs(log_prob, inputs["old"], inputs["rollout"], inputs["advantages"],
                                       inputs["mask"])  # fmt: skip
    loss, metrics = reference.tis_policy_loss(batch, loss_config, correction,
                                              reference.GlobalBatchInfo(**global_batch_info))  # fmt: skip
    (grad,) = torch.autograd.grad(loss, log_prob)
    return loss.detach(), grad, metrics


def assert_same(ours, theirs, metrics=("actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower")):
    torch.testing.assert_close(ours[0], theirs[0], **LOSS_TOL)
    torch.testing.assert_close(ours[1], theirs[1], **GRAD_TOL)
    for key in metrics:
        assert ours[2][key] == pytest.approx(theirs[2][key], abs=1e-6), key


def test_registered_under_its_name():
    assert core_algos.get_policy_loss_fn(POLICY_LOSS) is verl_loss.flash_rc_tis_loss


@pytest.mark.parametrize("clip", CLIPS)
@pytest.mark.parametrize("agg_mode", AGG_MODES)
@pytest.mark.parametrize("seed", SEEDS)
def test_equals_verl_token_tis_and_flash_rc_reference(seed, agg_mode, clip):
    inputs = random_batch(seed)
    weights = verl_weights(inputs)
    config, vanilla_config = actor_config(clip), actor_config(clip, loss_mode="vanilla")
    ours = run(core_algos.get_policy_loss_fn(POLICY_LOSS), inputs, config, weights, agg_mode)
    verl = run(core_algos.compute_policy_loss_vanilla, inputs, vanilla_config, weights, agg_mode)
    flash_rc = reference_loss(inputs, clip, agg_mode, RolloutCorrectionConfig(level="token", threshold=THRESHOLD))
    assert_same(ours, verl)
    torch.testing.assert_close(ours[0], flash_rc[0], **LOSS_TOL)
    torch.testing.assert_close(ours[1], flash_rc[1], **GRAD_TOL)
    for ours_key, reference_key in verl_loss.METRICS.items():
        assert ours[2][ours_key] == pytest.approx(flash_rc[2][reference_key].item(), abs=1e-6), ours_key

    # The case is not trivial: TIS truncates, and every clip branch is taken (flash_rc's metrics say so).
    assert flash_rc[2]["rollout_corr/rollout_is_ratio_fraction_high"] > 0
    assert (weights[inputs["mask"]] == THRESHOLD).any()
    for key in ("actor/pg_clipfrac_high", "actor/pg_clipfrac_low", "actor/pg_clipfrac_lower"):
        assert ours[2][key] > 0, key
    assert ours[2]["rollout_corr/nonfinite_token_fraction"] == 0


@pytest.mark.parametrize("agg_mode", ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean"))
def test_data_parallel_global_batch_info(agg_mode):
    """dp_size = 4 with the global counts ``ppo_loss`` writes: each rank scales by D and divides by global counts."""
    inputs = random_batch(seed=3)
    weights = verl_weights(inputs)
    info = {"dp_size": 4, "batch_num_tokens": int(inputs["mask"].sum()) * 4 + 7, "global_batch_size": 8 * 4 + 1,
            "loss_scale_factor": None}  # fmt: skip
    ours = run(verl_loss.flash_rc_tis_loss, inputs, actor_config("dapo", **info), weights, agg_mode)
    verl = run(core_algos.compute_policy_loss_vanilla, inputs, actor_config("dapo", "vanilla", **info), weights,
               agg_mode)  # fmt: skip
    flash_rc = reference_loss(inputs, "dapo", agg_mode, RolloutCorrectionConfig(threshold=THRESHOLD), **info)
    assert_same(ours, verl)
    torch.testing.assert_close(ours[0], flash_rc[0], **LOSS_TOL)
    # Hand-worked scale: with global counts the loss is D/N_global times the local sum (token-mean), so it differs
    # from the single-rank loss of the same micro-batch.
    single = run(verl_loss.flash_rc_tis_loss, inputs, actor_config("dapo"), weights, agg_mode)
    assert not torch.allclose(ours[0], single[0])

    missing = {"dp_size": 4}  # verl refuses this too (agg_loss raises)
    with pytest.raises(ValueError, match="dp_size=4 needs"):
        run(verl_loss.flash_rc_tis_loss, inputs, actor_config("dapo", **missing), weights, agg_mode)
    with pytest.raises(ValueError, match="required when dp_size > 1"):
        run(core_algos.compute_policy_loss_vanilla, inputs, actor_config("dapo", "vanilla", **missing), weights,
            agg_mode)  # fmt: skip


@pytest.mark.parametrize(("rollout_is", "threshold"), [("sequence", 5.0), ("token", "0.5_2.0"),
                                                       ("sequence", "0.1_8.0")])  # fmt: skip
def test_other_verl_weightings_are_applied_as_given(rollout_is, threshold):
    """verl's sequence-level TIS and its IcePop masking (weights exactly 0 outside [lo, hi]) reach the loss as weights
    too; the loss applies them as given. Zero-weight tokens stay in the denominators (verl keeps them there)."""
    inputs = random_batch(seed=4)
    weights = verl_weights(inputs, rollout_is, threshold)
    for agg_mode in ("token-mean", "seq-mean-token-mean"):
        ours = run(verl_loss.flash_rc_tis_loss, inputs, actor_config("dapo"), weights, agg_mode)
        verl = run(core_algos.compute_policy_loss_vanilla, inputs, actor_config("dapo", "vanilla"), weights, agg_mode)
        metrics = ("actor/ppo_kl",) if isinstance(threshold, str) else ("actor/ppo_kl", "actor/pg_clipfrac")
        assert_same(ours, verl, metrics)  # IcePop: zero-weight tokens leave the clip fractions (module docstring)
    if isinstance(threshold, str):
        assert (weights[inputs["mask"]] == 0).any()


def test_without_weights_it_is_plain_ppo_clip():
    """``rollout_is: null`` (metrics-only rollout correction, or none): no weights arrive, w = 1."""
    inputs = random_batch(seed=5)
    ours = run(verl_loss.flash_rc_tis_loss, inputs, actor_config("dapo"), None, "token-mean")
    verl = run(core_algos.compute_policy_loss_vanilla, inputs, actor_config("dapo", "vanilla"), None, "token-mean")
    assert_same(ours, verl)


def test_a_nonfinite_token_is_dropped_and_counted():
    """verl's vanilla turns one NaN into a NaN loss; ours drops that token (as flash_rc's local learner does)."""
    inputs = random_batch(seed=6)
    weights = verl_weights(inputs)
    inputs["log_prob"][0, 3] = float("nan")
    ours = run(verl_loss.flash_rc_tis_loss, inputs, actor_config(), weights, "token-mean")
    verl = run(core_algos.compute_policy_loss_vanilla, inputs, actor_config(loss_mode="vanilla"), weights, "token-mean")
    assert torch.isnan(verl[0]) and torch.isfinite(ours[0]) and ours[1][0, 3] == 0
    assert ours[2]["rollout_corr/nonfinite_token_fraction"] == pytest.approx(1 / int(inputs["mask"].sum()))


def test_bad_actor_settings_fail_with_one_line_naming_the_key():
    inputs = random_batch(seed=0)
    # verl accepts clip_ratio_low = 1.5 (1 − ε_low < 0: the low clip never acts); flash_rc's loss config refuses it.
    config = ActorConfig(strategy="fsdp", rollout_n=4, ppo_mini_batch_size=8, ppo_micro_batch_size_per_gpu=4,
                         clip_ratio_low=1.5)  # fmt: skip
    with pytest.raises(ValueError, match=r"^actor_rollout_ref\.actor\.clip_ratio_low=1\.5: .*flash_rc_tis") as error:
        run(verl_loss.flash_rc_tis_loss, inputs, config, None, "token-mean")
    assert "\n" not in str(error.value)


def test_triton_kernel_path(monkeypatch):
    """The loss with the fused Triton kernel (GPU, or Triton's interpreter on CPU: tests/conftest.py) == verl."""
    monkeypatch.setattr(verl_loss, "fused_tis_loss", functools.partial(verl_loss.fused_tis_loss, backend="triton"))
    inputs = random_batch(seed=7, batch=4, length=20)
    weights = verl_weights(inputs)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    inputs = {name: tensor.to(device) for name, tensor in inputs.items()}
    for agg_mode in ("token-mean", "seq-mean-token-mean"):
        ours = run(verl_loss.flash_rc_tis_loss, inputs, actor_config("dapo"), weights.to(device), agg_mode)
        verl = run(core_algos.compute_policy_loss_vanilla, inputs, actor_config("dapo", "vanilla"), weights.to(device),
                   agg_mode)  # fmt: skip
        assert_same(ours, verl)


# ---------------------------------------------------------------------------------------------------- verl's call site


def ppo_loss_data(inputs, weights, prompt_lengths):
    """verl's actor mini-batch as ``ppo_loss`` reads it: padded prompts/responses + attention mask, the per-token
    fields, the global counts the FSDP engine writes, and the model's unpadded log-prob output (one value per
    prompt + response token; response token t's log-prob sits at position prompt_len + t − 1 of its sequence)."""
    from tensordict import TensorDict
    from verl.utils import tensordict_utils as tu

    batch, length = inputs["mask"].shape
    prompt_width = int(max(prompt_lengths))
    response_lengths = inputs["mask"].sum(-1)
    prompt_mask = torch.arange(prompt_width).flip(0) < torch.tensor(prompt_lengths)[:, None]  # left-padded prompts
    attention_mask = torch.cat([prompt_mask, inputs["mask"]], dim=1).long()
    values = []
    for row in range(batch):
        sequence = torch.zeros(prompt_lengths[row] + int(response_lengths[row]))
        sequence[prompt_lengths[row] - 1 : prompt_lengths[row] - 1 + int(response_lengths[row])] = inputs["log_prob"][
            row, : int(response_lengths[row])
        ]
        values.append(sequence)
    data = TensorDict({
        "prompts": torch.ones(batch, prompt_width, dtype=torch.long),
        "responses": torch.ones(batch, length, dtype=torch.long),
        "attention_mask": attention_mask,
        "response_mask": inputs["mask"].long(),
        "old_log_probs": inputs["old"],
        "advantages": inputs["advantages"],
        "rollout_is_weights": weights,
    }, batch_size=[batch])  # fmt: skip
    tu.assign_non_tensor(data, dp_size=2, batch_num_tokens=int(inputs["mask"].sum()) * 2, global_batch_size=2 * batch)
    return data, torch.cat(values)


def test_through_verls_ppo_loss_call_site():
    """verl's ``ppo_loss`` (the FSDP worker's loss) selects our loss by ``policy_loss.loss_mode`` and gives what it
    gives with ``vanilla``: the same loss, gradient w.r.t. the model's output, and ``actor/*`` metrics."""
    from verl.workers.utils.losses import ppo_loss

    inputs = random_batch(seed=8)
    inputs["mask"][1, 0] = True  # ppo_loss's padding helpers need every row to have a response token
    weights = verl_weights(inputs)
    prompt_lengths = [3, 5, 1, 4, 2, 6, 3, 2]
    results = {}
    for loss_mode in (POLICY_LOSS, "vanilla"):
        data, values = ppo_loss_data(inputs, weights, prompt_lengths)
        values.requires_grad_()
        loss, metrics = ppo_loss(actor_config("dapo", loss_mode), {"log_probs": values}, data)
        (grad,) = torch.autograd.grad(loss, values)
        results[loss_mode] = loss.detach(), grad, {k: m.aggregate() for k, m in metrics.items() if hasattr(m, "values")}
    ours, verl = results[POLICY_LOSS], results["vanilla"]
    assert_same(ours, verl, ("actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower", "actor/pg_loss"))
    assert ours[1].abs().sum() > 0
