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
from pydantic import BaseModel, Field, ValidationError, create_model

from flash_rc.errors import ConfigError
from flash_rc.rollout.engine_config import EngineConfig
from flash_rc.schema import Section, fields_of
from flash_rc.types import SamplingConfig

__all__ = ["ConfigError", "ENGINE_RECIPE_KEYS", "Section", "engine_config", "load_recipe"]

ENGINE_EXTRA_FIELDS = ("precision", "fp8_granularity", "scales", "quantizer", "fp32_lm_head", "kv_cache_dtype",
                       "visibility_sample", "kv_cache_gib", "inflight_update")
"""Engine settings verl has no key for: ``flash_rc.engine.<name>``, named as in ``EngineConfig``."""

ENGINE_RECIPE_KEYS: dict[str, str] = {
    "actor_rollout_ref.model.path": "model",
    "actor_rollout_ref.rollout.dtype": "dtype",
    "actor_rollout_ref.rollout.max_model_len": "max_model_len",
    "actor_rollout_ref.rollout.gpu_memory_utilization": "gpu_memory_utilization",
    "actor_rollout_ref.rollout.tensor_model_parallel_size": "tensor_parallel_size",
    "actor_rollout_ref.rollout.enforce_eager": "enforce_eager",
    "actor_rollout_ref.rollout.enable_prefix_caching": "enable_prefix_caching",
    "actor_rollout_ref.rollout.max_num_seqs": "max_num_seqs",
    "actor_rollout_ref.rollout.engine_kwargs.vllm": "engine_kwargs",
    **{f"flash_rc.engine.{name}": name for name in ENGINE_EXTRA_FIELDS},
}
"""The one map from recipe keys to ``EngineConfig`` fields: the sections below copy each field (type, bounds,
docstring) from ``EngineConfig`` by this table, and :func:`engine_config` reads the recipe through it."""


def _engine_fields(section_path: str, **defaults: Any) -> dict[str, tuple[Any, Any]]:
    """The EngineConfig fields a recipe section holds directly, under their recipe names."""
    names = {path.rpartition(".")[2]: field for path, field in ENGINE_RECIPE_KEYS.items()
             if path.rpartition(".")[0] == section_path}
    return fields_of(EngineConfig, names, **defaults)


class SamplingKwargs(Section):
    """verl's ``rollout.val_kwargs``: how evaluation / decoding samples (bounds as vLLM enforces them)."""

    temperature: float = Field(1.0, ge=0, le=2)
    """Sampling temperature (0: greedy)."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling mass."""
    top_k: int = Field(-1, ge=-1)
    """Top-k (-1 or 0: off)."""
    n: int = Field(1, ge=1)
    """Samples (independent chains) per problem."""
    do_sample: bool = True
    """False forces greedy decoding (temperature 0)."""

    def sampling(self) -> SamplingConfig:
        return SamplingConfig(
            temperature=self.temperature if self.do_sample else 0.0, top_p=self.top_p, top_k=self.top_k
        )


class _RolloutKeys(Section):
    name: Literal["vllm"] = "vllm"
    """Rollout backend; flash_rc runs vLLM."""
    val_kwargs: SamplingKwargs = SamplingKwargs()
    """Sampling for evaluation / decoding."""
    engine_kwargs: dict[str, dict[str, Any]] = Field(default_factory=dict)
    """Per-engine extra arguments; ``engine_kwargs.vllm`` goes verbatim to ``vllm.LLM``."""


RolloutSection = create_model(
    "RolloutSection", __base__=_RolloutKeys,
    __doc__="verl's ``actor_rollout_ref.rollout`` keys the local engine honours.",
    **_engine_fields("actor_rollout_ref.rollout"),
)
ModelSection = create_model(
    "ModelSection", __base__=Section, __doc__="verl's ``actor_rollout_ref.model``.",
    **_engine_fields("actor_rollout_ref.model", path="smollm2-135m-instruct"),
)


class ActorRolloutRefSection(Section):
    model: ModelSection = ModelSection()
    rollout: RolloutSection = RolloutSection()


EngineExtras = create_model(
    "EngineExtras", __base__=Section,
    __doc__="``flash_rc.engine``: engine settings verl has no key for (see ``EngineConfig``).",
    **_engine_fields("flash_rc.engine"),
)


def engine_config(recipe: BaseModel) -> EngineConfig:
    """The rollout engine a recipe describes: every key of :data:`ENGINE_RECIPE_KEYS` the recipe has."""
    values: dict[str, Any] = {}
    for path, field in ENGINE_RECIPE_KEYS.items():
        node: Any = recipe
        for key in path.split("."):
            node = node.get(key) if isinstance(node, dict) else getattr(node, key, None)
            if node is None:
                break
        if node is not None:
            values[field] = node
    return EngineConfig(**values)


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
