"""Offline models: the tiny Qwen2 is deterministic, SmolLM2 converts from its GGUF, missing models say how to fix."""

import hashlib

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from flash_rc.models import ModelNotFoundError, build_tiny_qwen2, resolve_model


def digest(directory):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def test_tiny_model_is_deterministic(tmp_path):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    build_tiny_qwen2(tmp_path / "a")
    build_tiny_qwen2(tmp_path / "b")
    assert digest(tmp_path / "a") == digest(tmp_path / "b")


def test_tiny_model_has_a_working_chat_template(tiny_model):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "What is 3 + 4?"}], tokenize=False,
                                         add_generation_prompt=True)
    assert text == "<|im_start|>user\nWhat is 3 + 4?<|im_end|>\n<|im_start|>assistant\n"
    # the locally trained BPE merges common words and digits: far fewer tokens than bytes
    assert len(tokenizer(text).input_ids) < len(text) / 2
    assert tokenizer.decode(tokenizer(text).input_ids) == text


def test_smollm2_is_a_real_pretrained_chat_model():
    path = resolve_model("smollm2-135m-instruct")  # converted once from the GGUF by `make install`
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert model.config.num_hidden_layers == 30 and "<|im_start|>" in tokenizer.chat_template
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                        add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    out = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1]:])


def test_missing_model_says_how_to_get_it(tmp_path):
    with pytest.raises(ModelNotFoundError, match="never downloads"):
        resolve_model(tmp_path / "no-such-model")
    with pytest.raises(ModelNotFoundError):
        resolve_model("Qwen/Qwen2.5-0.5B-Instruct")  # a hub id is not a local directory
