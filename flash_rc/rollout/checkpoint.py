"""HF safetensors checkpoints as weight sources, the validation every weight update passes, and quantized export.

A weight update must be checked *before* the engine is touched (a half-applied update would leave the engine serving
a mix of two policies), and must stream in an order that lets vLLM finish one decoder layer before the next starts
(its layerwise reload buffers a layer's tensors until the layer is complete). Checkpoint folders are read lazily, one
tensor at a time, so even the engine's initial load never holds a second copy of the model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

import torch

from flash_rc.algo.quant import FP8_GRANULARITIES, WEIGHT_DTYPES
from flash_rc.errors import WeightUpdateError


def checkpoint_shapes(model_path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of an HF safetensors checkpoint, read from file headers (no weights loaded)."""
    return CheckpointTensors(model_path).shapes


def validate_weights(
    weights: Mapping[str, torch.Tensor], expected: Mapping[str, tuple[int, ...]], strict: bool = True,
    max_abs: Callable[[str], float] = lambda name: torch.finfo(torch.float32).max, checked=None,
) -> None:
    """Reject an update whose names, types, shapes, dtypes or values cannot be loaded, naming every offending tensor.

    ``max_abs(name)`` is the largest magnitude the engine can hold for that tensor (its dtype's range for a tensor
    loaded as is: a float32 1e39 would become inf in bf16). ``checked`` (a ``reload.TensorSet``) receives the tensors
    checked (all within range when this returns).
    """
    if not isinstance(weights, Mapping):
        raise WeightUpdateError(
            f"weights must be a mapping name -> tensor (e.g. a state dict), got {type(weights).__name__}, so they can "
            "be validated before loading"
        )
    problems = []
    unknown = sorted(set(weights) - set(expected))
    if unknown:
        problems.append(f"unknown tensors (not in the checkpoint): {unknown[:8]}{' ...' if len(unknown) > 8 else ''}")
    missing = sorted(set(expected) - set(weights)) if strict else []
    if missing:
        problems.append(f"missing tensors (strict update): {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    problems += tensor_problems(weights, expected, names=[name for name in weights if name in expected],
                                max_abs=max_abs, checked=checked)
    if problems:
        raise WeightUpdateError("weight update rejected, engine weights unchanged:\n  " + "\n  ".join(problems))


def tensor_problems(weights: Mapping[str, torch.Tensor], expected: Mapping[str, tuple[int, ...]] | None = None,
                    names: Iterable[str] | None = None,
                    max_abs: Callable[[str], float] = lambda name: torch.finfo(torch.float32).max,
                    checked=None) -> list[str]:
    """Why tensors cannot be loaded (not a tensor, no data, wrong shape or dtype, NaN/inf or out of range), one line
    per bad tensor.

    Reads one tensor at a time (a lazy source is never materialized whole) and checks values with one reduction per
    tensor (``aminmax``: NaN propagates, so a single pass finds NaN, inf and out-of-range values) and one host sync per
    device for all tensors: a sync per tensor would stall a GPU pipeline.
    """
    problems: list[str] = []
    in_range: dict[torch.device, tuple[list[str], list[torch.Tensor]]] = {}
    for name in weights if names is None else names:
        tensor = weights[name]
        if not isinstance(tensor, torch.Tensor):
            problems.append(f"{name}: expected a torch.Tensor, got {type(tensor).__name__}")
        elif tensor.is_meta or local_tensor(tensor).is_meta:
            problems.append(f"{name}: is a meta tensor (a shape without data)")
        elif expected is not None and tuple(tensor.shape) != tuple(expected[name]):
            problems.append(f"{name}: shape {tuple(tensor.shape)} != checkpoint shape {tuple(expected[name])}")
        elif tensor.dtype not in WEIGHT_DTYPES:
            problems.append(f"{name}: dtype {tensor.dtype} is not one of {[str(d) for d in WEIGHT_DTYPES]}")
        else:
            local = local_tensor(tensor)
            if checked is not None:  # by weak reference: any problem below refuses the whole update
                checked.add(tensor)
            device_names, flags = in_range.setdefault(local.device, ([], []))
            device_names.append(name)
            flags.append(within_range(local, max_abs(name)))
    for device_names, flags in in_range.values():
        problems += [_range_problem(weights[n], max_abs(n), n)
                     for n, ok in zip(device_names, torch.stack(flags).tolist()) if not ok]
    return problems


def within_range(tensor: torch.Tensor, limit: float) -> torch.Tensor:
    """0-dim bool: every value finite and within ±limit (an empty tensor is)."""
    if tensor.numel() == 0:
        return torch.ones((), dtype=torch.bool, device=tensor.device)
    low, high = torch.aminmax(tensor)
    return (low >= -limit) & (high <= limit)


def _range_problem(tensor: torch.Tensor, limit: float, name: str) -> str:
    local = local_tensor(tensor)
    if not torch.isfinite(local).all():
        return f"{name}: contains NaN or inf"
    return f"{name}: |values| up to {local.abs().max().item():.3g} exceed the engine's range (±{limit:.3g})"


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The locally held part of a (possibly distributed) tensor, without communication."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def layer_key(name: str) -> tuple[int, str]:
    """Sort key putting tensors of the same decoder layer together, in layer order, and every other tensor (final
    norm, lm_head, embeddings) after the last layer.

    Why embeddings last: vLLM's loader keeps the last tensor it saw for each module prefix until the stream ends, so
    the first tensors of a stream stay alive through it; a small layer tensor there costs nothing, the embedding
    (often the largest tensor) would stay in memory for the whole sync.
    """
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part == "layers" and parts[i + 1].isdigit():
            return (int(parts[i + 1]), name)
    return (1 << 30, name)


def stream_in_layer_order(weights: Mapping[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, full tensor)`` one at a time in decoder-layer order, gathering DTensors lazily."""
    for name in sorted(weights, key=layer_key):
        yield name, full_tensor(weights[name])


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor, without autograd history: a DTensor is gathered (``full_tensor()``, which every rank must
    join in the same order); a tensor that needs no detaching is returned as the very object given, so checks keyed
    by identity (``reload.TensorSet``) still recognise it."""
    if hasattr(tensor, "full_tensor"):
        tensor = tensor.full_tensor()
    return tensor.detach() if tensor.requires_grad else tensor


TIED_ALIAS = "lm_head.weight"
"""The tensor a tied-embedding model's checkpoint does not store (HF's ``save_pretrained`` drops it)."""


def ties_word_embeddings(model_path: Path) -> bool:
    """Whether the folder's ``config.json`` says (explicitly) that lm_head is the input embedding."""
    import json

    config_file = Path(model_path) / "config.json"
    if not config_file.is_file():
        return False
    config = json.loads(config_file.read_text())
    return bool(config.get("tie_word_embeddings", (config.get("text_config") or {}).get("tie_word_embeddings")))


class CheckpointTensors(Mapping):
    """The tensors of an HF safetensors folder as a lazy mapping: each tensor is read when it is streamed.

    A tied-embedding model's folder that also stores ``lm_head.weight`` (flash_rc's learner did before 2026-12-01)
    is read as HF's layout, without that alias: checkpoints of one model then have one tensor set however they were
    written, so an engine started from either layout accepts the other.
    """

    def __init__(self, model_path: Path):
        from safetensors import safe_open

        self._files: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        """Name → shape of every tensor, from the file headers."""
        for file in sorted(Path(model_path).glob("*.safetensors")):
            with safe_open(file, framework="pt") as f:
                for name in f.keys():
                    self._files[name] = file
                    self.shapes[name] = tuple(f.get_slice(name).get_shape())
        if not self._files:
            raise FileNotFoundError(f"no *.safetensors weights in {model_path}")
        if TIED_ALIAS in self._files and ties_word_embeddings(model_path):
            del self._files[TIED_ALIAS], self.shapes[TIED_ALIAS]

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
        written: list[list[str]] = []  # tensor names per shard, in shard order
        shard: dict[str, torch.Tensor] = {}
        size = 0

        def flush() -> None:  # each shard goes to disk as soon as it is full: memory stays at one shard
            save_file(shard, staging / f"shard-{len(written):05d}.safetensors", metadata={"format": "pt"})
            written.append(list(shard))
            shard.clear()

        for name, tensor in stream_in_layer_order(CheckpointTensors(model_path)):
            for out_name, out_tensor in fmt.convert(name, tensor):
                nbytes = out_tensor.numel() * out_tensor.element_size()
                if shard and size + nbytes > shard_bytes:
                    flush()
                    size = 0
                shard[out_name] = out_tensor.contiguous()
                size += nbytes
        flush()
        weight_map = {}
        for index, names in enumerate(written):
            file = ("model.safetensors" if len(written) == 1
                    else f"model-{index + 1:05d}-of-{len(written):05d}.safetensors")
            (staging / f"shard-{index:05d}.safetensors").rename(staging / file)
            weight_map.update(dict.fromkeys(names, file))
        if len(written) > 1:
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
    parser.add_argument("--fp8-granularity", default="channel", choices=FP8_GRANULARITIES)
    args = parser.parse_args(argv)
    print(export_quantized(resolve_model(args.model), Path(args.out), args.precision, args.fp8_granularity))
    return 0
