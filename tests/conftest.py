"""Shared fixtures: the tiny model and one real vLLM engine per session (starting one costs seconds)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


# Without a GPU the Triton kernels run on CPU tensors through Triton's interpreter. It must be on before anything
# imports a kernel module (flash_rc.rollout.formats imports the quantizers), hence here, first. vLLM runs fine with it.
if not _cuda_available():
    os.environ["TRITON_INTERPRET"] = "1"
REPO = Path(__file__).resolve().parents[1]
GSM8K_DIR = REPO.parent / "shared" / "data" / "gsm8k"


def pytest_collection_modifyitems(config, items):
    if _cuda_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    from flash_rc.models import resolve_model

    return resolve_model("tiny-qwen2")


class EngineSlot:
    """The process's one live RolloutEngine (vLLM allows one): reused while the config matches, else restarted."""

    def __init__(self):
        self.engine = None

    def get(self, config):
        from flash_rc.rollout.engine import RolloutEngine

        if self.engine is not None and self.engine.config == config:
            return self.engine
        self.close()
        self.engine = RolloutEngine(config)
        return self.engine

    def close(self):
        if self.engine is not None:
            self.engine.close()
            self.engine = None


@pytest.fixture(scope="session")
def engine_slot():
    slot = EngineSlot()
    yield slot
    slot.close()


def tiny_engine_config(tiny_model, **overrides):
    from flash_rc.rollout.engine import EngineConfig

    return EngineConfig(**{"model": str(tiny_model), "dtype": "float32", "max_model_len": 1024,
                           "kv_cache_gib": 0.25, **overrides})


@pytest.fixture()
def tiny_config(tiny_model):
    """``tiny_config(**overrides)``: the tiny engine's config with some fields changed (shares ``engine_slot``)."""
    return lambda **overrides: tiny_engine_config(tiny_model, **overrides)


@pytest.fixture()
def tiny_engine(engine_slot, tiny_model):
    """A float32 engine on the tiny model. Tests that change its weights must put the original ones back."""
    return engine_slot.get(tiny_engine_config(tiny_model))


@pytest.fixture(scope="session")
def gsm8k_dir() -> Path:
    if not (GSM8K_DIR / "test.jsonl").exists():
        pytest.fail(f"GSM8K data not found at {GSM8K_DIR}: the tests read the real GSM8K from ../shared/data/gsm8k")
    return GSM8K_DIR
