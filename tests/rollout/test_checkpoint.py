"""Checkpoint sources, validation helpers and the compressed-tensors export (flash_rc/rollout/checkpoint.py)."""

import json
import weakref
from collections.abc import Mapping

import pytest
import torch

from flash_rc.rollout.checkpoint import CheckpointTensors, export_quantized, linear_weight_names
from flash_rc.rollout.engine import EngineConfig, SamplingConfig

PROMPTS = [[{"role": "user", "content": f"What is {i} + 4?"}] for i in range(4)]


def test_linear_weight_names_are_every_projection(tiny_model):
    names = linear_weight_names(tiny_model)
    # 2 layers x (q, k, v, o, gate, up, down); no lm_head, embeddings or norms
    assert len(names) == 14 and "model.layers.1.self_attn.k_proj.weight" in names
    assert not any("lm_head" in n or "norm" in n or "embed" in n for n in names)


def test_export_loads_in_plain_vllm_and_matches_the_synced_engine(engine_slot, tiny_model, tmp_path):
    sampling = SamplingConfig(max_tokens=16, seed=3)
    synced = engine_slot.get(EngineConfig(model=str(tiny_model), dtype="float32", precision="int8",
                                          max_model_len=512, kv_cache_gib=0.25))
    assert synced.weight_format.quantized_names == linear_weight_names(tiny_model)
    expected = synced.generate(PROMPTS, sampling)

    exported = export_quantized(tiny_model, tmp_path / "int8", "int8")
    config = json.loads((exported / "config.json").read_text())
    assert config["quantization_config"]["format"] == "int-quantized"
    tensors = CheckpointTensors(exported)
    assert tensors["model.layers.0.mlp.up_proj.weight"].dtype == torch.int8
    assert tensors["model.layers.0.mlp.up_proj.weight_scale"].shape == (256, 1)
    assert (exported / "tokenizer.json").exists()
    # a plain engine on the exported folder (vLLM reads the quantization config itself) holds the same codes
    loaded = engine_slot.get(EngineConfig(model=str(exported), dtype="float32", max_model_len=512, kv_cache_gib=0.25))
    for (a,), (b,) in zip(loaded.generate(PROMPTS, sampling), expected):
        assert a.token_ids == b.token_ids and a.logprobs == pytest.approx(b.logprobs, abs=1e-5)


def test_export_is_atomic(tiny_model, tmp_path):
    (tmp_path / "taken").mkdir()
    with pytest.raises(FileExistsError):
        export_quantized(tiny_model, tmp_path / "taken", "int8")
    with pytest.raises(ValueError, match="no quantization config"):
        export_quantized(tiny_model, tmp_path / "bad", "bf16")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]  # no half-written folder left behind


def test_engine_update_streams_one_layer_at_a_time(tiny_engine, tiny_model):
    """An update from a lazy mapping never holds much more than one decoder layer's tensors at once."""
    source = CheckpointTensors(tiny_model)
    alive: weakref.WeakSet = weakref.WeakSet()
    peak = []

    class LazyWeights(Mapping):
        def __getitem__(self, name):
            tensor = source[name]
            alive.add(tensor)
            peak.append(len(alive))
            return tensor

        def __iter__(self):
            return iter(source)

        def __len__(self):
            return len(source)

    tiny_engine.update_weights(LazyWeights())
    # 27 tensors: embeddings, 2 layers of 12 (q/k/v weight+bias, o, gate, up, down, 2 norms), final norm, lm_head.
    # Validation reads each once and lets it go; the stream keeps at most a layer's worth while vLLM buffers it.
    assert len(peak) == 2 * 27 and max(peak) <= 13


def test_export_writes_shards_with_an_index(tiny_model, tmp_path):
    exported = export_quantized(tiny_model, tmp_path / "sharded", "fp8", shard_bytes=200_000)
    index = json.loads((exported / "model.safetensors.index.json").read_text())["weight_map"]
    shards = sorted(p.name for p in exported.glob("*.safetensors"))
    assert len(shards) > 2 and set(index.values()) == set(shards)
    tensors = CheckpointTensors(exported)
    assert set(tensors) == set(index) and tensors["model.layers.1.self_attn.o_proj.weight"].dtype == torch.float8_e4m3fn


def test_a_stored_tied_alias_is_read_as_hfs_layout(engine_slot, tmp_path, tiny_model):
    # flash_rc's learner stored lm_head.weight beside embed_tokens.weight for tied models before 2026-12-01; such a
    # folder reads as HF's layout, so an engine started from the base model takes it (it refused it: "missing" or
    # "unknown tensors") — and an untied model keeps its lm_head
    import shutil

    from safetensors.torch import load_file, save_file

    from flash_rc.models import build_tiny_qwen2

    tied = tmp_path / "tied"
    build_tiny_qwen2(tied, tie_word_embeddings=True)
    (weights_file,) = tied.glob("*.safetensors")
    with_alias = tmp_path / "with_alias"
    shutil.copytree(tied, with_alias)
    state = load_file(weights_file)
    assert "lm_head.weight" not in state
    save_file({**state, "lm_head.weight": state["model.embed_tokens.weight"].clone()},
              with_alias / weights_file.name)  # fmt: skip
    assert set(CheckpointTensors(with_alias)) == set(CheckpointTensors(tied)) == set(state)
    assert "lm_head.weight" in CheckpointTensors(tiny_model)  # untied: a real tensor
    engine = engine_slot.get(EngineConfig(model=str(tied), dtype="float32", max_model_len=1024, kv_cache_gib=0.25))
    before = engine.model_version
    engine.load(CheckpointTensors(with_alias))
    assert engine.model_version == before + 1
