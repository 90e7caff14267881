"""HF safetensors checkpoints as weight sources, the validation every weight update passes, and quantized export.

A weight update must be checked *before* the engine is touched (a half-applied update would leave the engine serving
a mix of two policies), and must stream in an order that lets vLLM finish one decoder layer before the next starts
(its layerwise reload buffers a layer's tensors until the layer is complete). Checkpoint folders are read lazily, one
tensor at a time, so even the engine's initial load never holds a second copy of the model.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

import torch


class WeightUpdateError(ValueError):
    """A weight update was rejected before any engine weight was touched."""


def checkpoint_shapes(model_path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of an HF safetensors checkpoint, read from file headers (no weights loaded)."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for file in sorted(model_path.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                shapes[name] = tuple(f.get_slice(name).get_shape())
    if not shapes:
        raise FileNotFoundError(f"no *.safetensors weights in {model_path}")
    return shapes


def validate_weights(
    weights: Mapping[str, torch.Tensor], expected: Mapping[str, tuple[int, ...]], strict: bool = True
) -> None:
    """Reject an update whose names, shapes, dtypes or values cannot be loaded, naming every offending tensor."""
    if not isinstance(weights, Mapping):
        raise WeightUpdateError(
            "weights must be a mapping name -> tensor (e.g. a state dict) so they can be validated before loading"
        )
    problems = []
    unknown = sorted(set(weights) - set(expected))
    if unknown:
        problems.append(f"unknown tensors (not in the checkpoint): {unknown[:8]}{' ...' if len(unknown) > 8 else ''}")
    missing = sorted(set(expected) - set(weights)) if strict else []
    if missing:
        problems.append(f"missing tensors (strict update): {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    for name, tensor in weights.items():
        if name in expected:
            problem = tensor_problem(name, tensor, expected[name])
            problems += [problem] if problem else []
    if problems:
        raise WeightUpdateError("weight update rejected, engine weights unchanged:\n  " + "\n  ".join(problems))


def tensor_problem(name: str, tensor: torch.Tensor, expected_shape: tuple[int, ...] | None = None) -> str | None:
    """Why one learner tensor cannot be loaded (wrong shape, not floating point, NaN/inf), or None."""
    if expected_shape is not None and tuple(tensor.shape) != tuple(expected_shape):
        return f"{name}: shape {tuple(tensor.shape)} != checkpoint shape {tuple(expected_shape)}"
    if not tensor.is_floating_point():
        return f"{name}: dtype {tensor.dtype} is not a floating-point dtype"
    if not bool(torch.isfinite(_local(tensor)).all()):
        return f"{name}: contains NaN or inf"
    return None


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """The locally held part of a (possibly distributed) tensor, without communication."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _layer_index(name: str) -> tuple[int, str]:
    """Sort key putting tensors of the same decoder layer together, embeddings first and the head last."""
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part == "layers" and parts[i + 1].isdigit():
            return (int(parts[i + 1]) + 1, name)
    return (0 if "embed" in name else 1 << 30, name)


def stream_in_layer_order(weights: Mapping[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, full tensor)`` one at a time in decoder-layer order, gathering DTensors lazily."""
    for name in sorted(weights, key=_layer_index):
        tensor = weights[name]
        if hasattr(tensor, "full_tensor"):
            tensor = tensor.full_tensor()
        yield name, tensor.detach()


class CheckpointTensors(Mapping):
    """The tensors of an HF safetensors folder as a lazy mapping: each tensor is read when it is streamed."""

    def __init__(self, model_path: Path):
        from safetensors import safe_open

        self._files = {}
        for file in sorted(model_path.glob("*.safetensors")):
            with safe_open(file, framework="pt") as f:
                self._files.update({name: file for name in f.keys()})

    def __getitem__(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(self._files[name], framework="pt") as f:
            return f.get_tensor(name)

    def __iter__(self):
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)


# ---------------------------------------------------------------------- quantized export


def linear_weight_names(model_path: Path) -> frozenset[str]:
    """Checkpoint names of the model's ``nn.Linear`` weights, lm_head excluded: what a compressed-tensors config with
    ``targets: [Linear], ignore: [lm_head]`` quantizes (read from the HF model built on the meta device)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_path))
    return frozenset(
        f"{name}.weight" for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name.rpartition(".")[2] != "lm_head"
    )


def export_quantized(model_path: Path, out_dir: Path, precision: str, fp8_granularity: str = "channel",
                     shard_bytes: int = 5 << 30) -> Path:
    """Write a compressed-tensors W8A8 checkpoint (the format a flash_rc INT8/FP8 engine runs) from a bf16 model.

    Any vLLM loads it with no flash_rc code, e.g. to evaluate exactly the weights a quantized rollout engine held.
    Tensors are converted one at a time and written in shards; the folder appears only when complete.
    """
    import json
    import shutil
    import tempfile

    from safetensors.torch import save_file

    from flash_rc.rollout.formats import WeightFormat, compressed_tensors_config

    model_path, out_dir = Path(model_path), Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} exists; choose a new output directory")
    config = json.loads((model_path / "config.json").read_text())
    fmt = WeightFormat(precision=precision, fp8_granularity=fp8_granularity, scales="refresh",
                       quantized_names=linear_weight_names(model_path), visibility_sample=0.0,
                       dtype=getattr(torch, config.get("dtype") or config.get("torch_dtype") or "bfloat16"))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        shards: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        for name, tensor in stream_in_layer_order(CheckpointTensors(model_path)):
            for out_name, out_tensor in fmt.convert(name, tensor):
                nbytes = out_tensor.numel() * out_tensor.element_size()
                if size and size + nbytes > shard_bytes:
                    shards.append({})
                    size = 0
                shards[-1][out_name] = out_tensor.contiguous()
                size += nbytes
        weight_map = {}
        for index, shard in enumerate(shards, 1):
            file = "model.safetensors" if len(shards) == 1 else f"model-{index:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, staging / file, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, file))
        if len(shards) > 1:
            (staging / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}, indent=2))
        config["quantization_config"] = compressed_tensors_config(precision, fp8_granularity)
        (staging / "config.json").write_text(json.dumps(config, indent=2))
        for extra in model_path.iterdir():  # tokenizer, chat template, generation config
            if extra.is_file() and extra.suffix != ".safetensors" and extra.name not in ("config.json",
                                                                                          "model.safetensors.index.json"):
                shutil.copy2(extra, staging / extra.name)
        staging.rename(out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def main(argv: list[str]) -> int:
    """``flash-rc quantize MODEL OUT --precision int8|fp8``: export a compressed-tensors W8A8 checkpoint."""
    import argparse

    from flash_rc.models import resolve_model

    parser = argparse.ArgumentParser(prog="flash-rc quantize", description=export_quantized.__doc__.split("\n\n")[0])
    parser.add_argument("model", help="bf16 HF model directory or built-in model name")
    parser.add_argument("out", help="new output directory")
    parser.add_argument("--precision", required=True, choices=["int8", "fp8"])
    parser.add_argument("--fp8-granularity", default="channel", choices=["channel", "tensor", "block"])
    args = parser.parse_args(argv)
    print(export_quantized(resolve_model(args.model), Path(args.out), args.precision, args.fp8_granularity))
    return 0
