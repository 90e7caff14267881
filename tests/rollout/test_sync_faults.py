"""Fault injection for the weight sync, on the real CPU engine: no sync may leave the engine unable to serve.

Each case is one the sync must survive over thousands of RL steps: partial updates of fused and quantized layers,
sources that fail midway or turn NaN after validation, values finite in float32 but not in the engine dtype, wrong
source types, and KV blocks computed from bad weights. Every case runs on a bf16-style (unquantized) and an INT8
engine where both apply.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import pytest
import torch

from flash_rc.rollout.checkpoint import CheckpointTensors
from flash_rc.rollout.engine import SamplingConfig, WeightUpdateError
from flash_rc.rollout.sync import sync

PROMPTS = [[{"role": "user", "content": "What is 3 + 4?"}], [{"role": "user", "content": "Name a colour."}]]
GREEDY = SamplingConfig(max_tokens=8, temperature=0.0)
QKV_0 = [f"model.layers.0.self_attn.{p}_proj.{k}" for p in "qkv" for k in ("weight", "bias")]


def outputs(engine):
    return [(c.token_ids, c.logprobs) for (c,) in engine.generate(PROMPTS, GREEDY)]


def all_finite(engine) -> bool:
    return all(math.isfinite(lp) for _, logprobs in outputs(engine) for lp in logprobs)


@pytest.fixture(params=["unquantized", "int8"])
def engine(request, engine_slot, tiny_model, tiny_config):
    overrides = {"precision": "int8"} if request.param == "int8" else {}
    engine = engine_slot.get(tiny_config(**overrides))
    yield engine
    sync(engine, checkpoint_of(tiny_model))  # every test leaves the original weights behind


def checkpoint_of(model) -> dict[str, torch.Tensor]:
    return {name: tensor.float() for name, tensor in CheckpointTensors(model).items()}


class FlakySource(Mapping):
    """A lazy source: reads ``weights``, and from its ``fail_after``-th read of ``name`` on returns ``bad()``."""

    def __init__(self, weights, name, bad, fail_after=1):
        self.weights, self.name, self.bad, self.fail_after, self.reads = weights, name, bad, fail_after, 0

    def __getitem__(self, key):
        if key == self.name:
            self.reads += 1
            if self.reads > self.fail_after:
                return self.bad()
        return self.weights[key]

    def __iter__(self):
        return iter(self.weights)

    def __len__(self):
        return len(self.weights)


def test_partial_update_of_part_of_a_fused_module_is_refused_naming_the_rest(engine, tiny_model):
    before = outputs(engine)
    weights = checkpoint_of(tiny_model)
    with pytest.raises(WeightUpdateError, match=r"qkv_proj is loaded as one unit.*but not .*k_proj.weight"):
        engine.update_weights({QKV_0[0]: weights[QKV_0[0]] * 2}, strict=False)
    assert outputs(engine) == before


def test_partial_updates_of_whole_modules_are_exact(engine, tiny_model):
    before = outputs(engine)
    weights = checkpoint_of(tiny_model)
    engine.update_weights({}, strict=False)  # an empty update touches nothing
    assert outputs(engine) == before
    engine.update_weights({name: weights[name] for name in QKV_0}, strict=False)  # the current values, re-sent
    assert outputs(engine) == before
    # new values for one fused module: the same engine as a full update with those values
    changed = {name: weights[name] * 1.5 for name in QKV_0}
    engine.update_weights(changed, strict=False)
    partial = outputs(engine)
    sync(engine, weights | changed)
    assert partial == outputs(engine) != before


@pytest.mark.parametrize("where", ["first layer", "middle"])
def test_a_source_that_fails_midway_leaves_the_engine_serving_and_a_full_sync_restores_it(engine, tiny_model, where):
    weights = checkpoint_of(tiny_model)
    before = outputs(engine)
    name = "model.layers.0.input_layernorm.weight" if where == "first layer" else "model.layers.1.mlp.up_proj.weight"

    def learner_went_away():
        raise ConnectionError("learner went away")

    bumped = {n: t * 1.01 for n, t in weights.items()}
    with pytest.raises(WeightUpdateError, match="learner went away"):
        engine.update_weights(FlakySource(bumped, name, learner_went_away))
    assert all_finite(engine)  # every module holds whole old or whole new weights
    if where == "first layer":
        assert outputs(engine) == before  # nothing was loaded
    sync(engine, weights)
    assert outputs(engine) == before


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_source_that_turns_non_finite_after_validation_is_refused_by_name(engine, tiny_model, bad):
    weights = checkpoint_of(tiny_model)
    before = outputs(engine)
    for name in ("model.layers.1.mlp.up_proj.weight", "model.layers.1.post_attention_layernorm.weight"):
        source = FlakySource(weights, name, lambda: torch.full_like(weights[name], bad))  # fine when validated
        with pytest.raises(WeightUpdateError, match=f"{name}.*(non-finite|NaN/inf)"):
            engine.update_weights(source)
        assert all_finite(engine)
        sync(engine, weights)
        assert outputs(engine) == before


def test_values_beyond_the_engine_dtype_are_refused_before_anything_is_touched(engine_slot, tiny_model, tiny_config):
    engine = engine_slot.get(tiny_config(dtype="bfloat16"))
    weights = checkpoint_of(tiny_model)
    before = outputs(engine)
    name = "model.norm.weight"
    huge = weights | {name: torch.full_like(weights[name], torch.finfo(torch.float32).max)}  # inf in bf16
    with pytest.raises(WeightUpdateError, match=rf"{name}: \|values\| up to 3.4e\+38 exceed the engine's range"):
        engine.update_weights(huge)
    assert outputs(engine) == before


@pytest.mark.parametrize("source, message", [
    ([torch.zeros(2)], "must yield \\(name, tensor\\) tuples, got Tensor"),
    (None, "got NoneType"),
    ("model.safetensors", "got str"),
    ({"model.norm.weight": None}, "model.norm.weight: expected a torch.Tensor, got NoneType"),
    ({"model.norm.weight": torch.empty(64, device="meta")}, "model.norm.weight: is a meta tensor"),
])
def test_wrong_source_types_are_weight_update_errors_naming_what_is_wrong(engine, source, message):
    before = outputs(engine)
    with pytest.raises(WeightUpdateError, match=message):
        sync(engine, source, strict=False)
    assert outputs(engine) == before


def test_kv_blocks_computed_from_bad_weights_are_never_reused(engine_slot, tiny_model, tiny_config):
    engine = engine_slot.get(tiny_config())
    weights = checkpoint_of(tiny_model)
    before = outputs(engine)

    def poison(model):  # what a bad update that slipped through would do: NaN activations, NaN K/V written
        model.get_submodule("model.layers.0.input_layernorm").weight.data.fill_(float("nan"))

    engine.apply_model(poison)
    assert not all_finite(engine)
    sync(engine, weights)
    assert outputs(engine) == before and outputs(engine) == before  # the same prompt twice: no stale NaN block


def test_bucketed_streams_load_each_module_whole(engine):
    """verl's buckets are cut by size: tensors of a module split across two buckets wait for the rest of it."""
    reloader = engine._reloader
    first_bucket = ["model.norm.weight", *QKV_0[:3]]  # q weight + bias, k weight: qkv_proj is not complete yet
    ready, waiting = reloader.complete_modules(first_bucket)
    assert ready == ["model.norm.weight"] and waiting == QKV_0[:3]
    ready, waiting = reloader.complete_modules(waiting + QKV_0[3:])
    assert ready == QKV_0 and waiting == []
    assert reloader.complete_modules(QKV_0[:1], everything=True) == (QKV_0[:1], [])  # the stream ended
