"""Recipe configs: hydra-style YAML in verl's key names, plus a ``flash_rc:`` section for what verl has no key for.

One recipe language serves both backends: the verl backend hands the YAML to verl's hydra (``defaults: [ppo_trainer]``
pulls verl's own defaults), and flash_rc's local entry points read the *same* file with this module. Local readers
only know the keys they implement and validate with pydantic (``extra="forbid"``), so a key they cannot honour is a
clear error naming its path — never silently ignored. ``defaults`` and ``hydra`` (composition directives for verl's
hydra) are the only keys dropped.

Command-line overrides use hydra syntax: ``key.sub=value`` (``+key=value`` is accepted too).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar

from omegaconf import OmegaConf
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from flash_rc.rollout.engine import EngineConfig, SamplingConfig


class ConfigError(ValueError):
    """A recipe that cannot be run as written."""


class Section(BaseModel):
    """Base of every recipe section: unknown keys are errors, field docstrings are the documentation."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)


class SamplingKwargs(Section):
    """verl's ``rollout.val_kwargs``: how evaluation / decoding samples."""

    temperature: float = Field(1.0, ge=0)
    """Sampling temperature (0: greedy)."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling mass."""
    top_k: int = -1
    """Top-k (-1: off)."""
    n: int = Field(1, ge=1)
    """Samples (independent chains) per problem."""
    do_sample: bool = True
    """False forces greedy decoding (temperature 0)."""

    def sampling(self) -> SamplingConfig:
        return SamplingConfig(
            temperature=self.temperature if self.do_sample else 0.0, top_p=self.top_p, top_k=self.top_k
        )


class RolloutSection(Section):
    """verl's ``actor_rollout_ref.rollout`` keys the local engine honours."""

    name: Literal["vllm"] = "vllm"
    """Rollout backend; flash_rc runs vLLM."""
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    """Engine compute dtype."""
    max_model_len: int = Field(4096, ge=16)
    """Context window per request (prompt + generation)."""
    gpu_memory_utilization: float = Field(0.5, gt=0, le=1)
    """GPU only: fraction of GPU memory for the engine."""
    tensor_model_parallel_size: int = Field(1, ge=1)
    """Tensor parallel degree of the engine."""
    enforce_eager: bool | None = None
    """Disable CUDA graphs / torch.compile (None: eager on CPU, compiled on GPU)."""
    enable_prefix_caching: bool = True
    """Reuse the KV cache of shared prompt prefixes."""
    max_num_seqs: int = Field(256, ge=1)
    """Continuous-batching width."""
    val_kwargs: SamplingKwargs = SamplingKwargs()
    """Sampling for evaluation / decoding."""
    engine_kwargs: dict[str, dict[str, Any]] = Field(default_factory=dict)
    """Per-engine extra arguments; ``engine_kwargs.vllm`` goes verbatim to ``vllm.LLM``."""


class ModelSection(Section):
    """verl's ``actor_rollout_ref.model``."""

    path: str = "smollm2-135m-instruct"
    """HF model directory, or a flash_rc built-in model name (see ``flash-rc models --list``)."""


class ActorRolloutRefSection(Section):
    model: ModelSection = ModelSection()
    rollout: RolloutSection = RolloutSection()


# ``flash_rc.engine``: the engine settings verl has no key for, with EngineConfig's own types, defaults and docs.
ENGINE_EXTRA_FIELDS = ("precision", "fp8_granularity", "scales", "quantizer", "fp32_lm_head", "kv_cache_dtype",
                       "visibility_sample", "kv_cache_gib", "inflight_update")
EngineExtras = create_model(
    "EngineExtras",
    __base__=Section,
    __doc__="``flash_rc.engine``: engine settings verl has no key for (see ``EngineConfig``).",
    **{name: (EngineConfig.model_fields[name].annotation, EngineConfig.model_fields[name])
       for name in ENGINE_EXTRA_FIELDS},
)


def engine_config(actor_rollout_ref: ActorRolloutRefSection, extras: EngineExtras) -> EngineConfig:
    """The rollout engine a recipe describes."""
    rollout = actor_rollout_ref.rollout
    return EngineConfig(
        model=actor_rollout_ref.model.path,
        dtype=rollout.dtype,
        max_model_len=rollout.max_model_len,
        gpu_memory_utilization=rollout.gpu_memory_utilization,
        tensor_parallel_size=rollout.tensor_model_parallel_size,
        enforce_eager=rollout.enforce_eager,
        enable_prefix_caching=rollout.enable_prefix_caching,
        max_num_seqs=rollout.max_num_seqs,
        engine_kwargs=dict(rollout.engine_kwargs.get("vllm", {})),
        **extras.model_dump(),
    )


SectionT = TypeVar("SectionT", bound=BaseModel)


def load_recipe(schema: type[SectionT], path: str | Path | None = None, overrides: list[str] = ()) -> SectionT:
    """Read a recipe YAML (optional), apply ``key=value`` overrides, and validate it against ``schema``."""
    base = OmegaConf.create()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"recipe file not found: {path}")
        base = OmegaConf.load(path)
    bad = [o for o in overrides if "=" not in o or o.startswith("~")]
    if bad:
        raise ConfigError(f"overrides must look like key.sub=value (deletions '~key' are not supported): {bad}")
    cli = OmegaConf.from_dotlist([o.removeprefix("+") for o in overrides])
    merged = OmegaConf.to_container(OmegaConf.merge(base, cli), resolve=True)
    for directive in ("defaults", "hydra"):
        merged.pop(directive, None)
    try:
        return schema.model_validate(merged)
    except ValidationError as error:
        lines = [f"  {'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors()]
        source = f" ({path})" if path else ""
        raise ConfigError(f"invalid recipe{source}:\n" + "\n".join(lines)) from None
