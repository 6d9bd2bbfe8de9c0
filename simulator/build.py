"""From a `SimulationConfig` to the parts of a simulation: model shape, cost model, KV pool size."""

from __future__ import annotations

from pathlib import Path

from sagellm.config import MAX_KV_BLOCKS, ConfigError, SageLLMConfig
from sagellm.core.kv.manager import KVCacheManager
from sagellm.core.pd import InferenceMode
from sagellm.core.scheduler import Scheduler
from sagellm.graph import dtype_bytes
from sagellm.models.presets import MODEL_PRESETS
from sagellm.models.shape import ModelShape
from simulator.cost.base import CostModel
from simulator.hardware.spec import HardwareError, HardwareSpec, load_spec


def resolve_shape(model: str | None, sagellm: SageLLMConfig, base_dir: Path = Path(".")) -> ModelShape:
    """A preset name, a model path (relative to `base_dir`), or None for `sagellm.model.model_id`."""
    if model is not None and model.lower() in MODEL_PRESETS:
        return MODEL_PRESETS[model.lower()]
    # Reading a real model's shape needs the loaders (and so torch); import only then.
    from sagellm.models.errors import ModelLoadError
    from sagellm.models.loader import read_model_shape
    from sagellm.models.paths import resolve_model_path

    model_id = model if model is not None else sagellm.model.model_id
    if model_id is not None and not Path(model_id).expanduser().is_absolute() and (base_dir / model_id).exists():
        model_id = str(base_dir / model_id)
    try:
        return read_model_shape(resolve_model_path(model_id))
    except (ModelLoadError, FileNotFoundError, ValueError) as exc:
        raise ConfigError(f"model: {model_id!r} is neither a preset {sorted(MODEL_PRESETS)} nor a readable "
                          f"model path ({exc})") from exc


def max_model_len(shape: ModelShape, sagellm: SageLLMConfig) -> int:
    """The context window, computed exactly as the engine does (before the KV-capacity cap)."""
    want = sagellm.model.max_model_len or shape.max_position_embeddings
    return min(want, shape.max_position_embeddings)


def kv_num_blocks(shape: ModelShape, sagellm: SageLLMConfig, spec: HardwareSpec | None,
                  memory_utilization: float) -> int:
    """KV blocks per replica: `kv_cache.num_blocks` if set; on a roofline device what is left of
    `memory_utilization` of its memory after the weights (as vLLM's gpu_memory_utilization); on the
    local machine (spec None) `kv_cache.memory_gb`, exactly as the engine sizes its pool."""
    kvc = sagellm.kv_cache
    b = dtype_bytes(sagellm.model.dtype)
    per_block = kvc.block_size * shape.kv_bytes_per_token(b)
    if kvc.num_blocks or spec is None:
        return kvc.device_blocks(per_block)
    weights = shape.num_parameters() * b
    free = spec.memory_capacity * memory_utilization - weights
    if free < per_block:
        raise ConfigError(
            f"hardware: {shape.name or 'the model'} needs {weights / 1e9:.1f} GB of weights in {sagellm.model.dtype}, "
            f"more than memory_utilization x capacity = {spec.memory_capacity * memory_utilization / 1e9:.1f} GB "
            f"of {spec.name}; use more memory_utilization, a smaller dtype or model"
        )
    blocks = int(free // per_block)
    if blocks > MAX_KV_BLOCKS:
        raise ConfigError(f"kv_cache.block_size: {spec.name}'s free memory holds {blocks} blocks of "
                          f"{kvc.block_size} tokens, more than {MAX_KV_BLOCKS}; use larger blocks or set num_blocks")
    return blocks


def kv_block_bytes(shape: ModelShape, sagellm: SageLLMConfig) -> int:
    """Bytes of one KV block (K and V of every layer), as the engine allocates it."""
    return sagellm.kv_cache.block_size * shape.kv_bytes_per_token(dtype_bytes(sagellm.model.dtype))


def build_scheduler(shape: ModelShape, sagellm: SageLLMConfig, num_blocks: int,
                    role: InferenceMode | None = None, deferred_decodes: bool = False) -> Scheduler:
    """The scheduler of one worker, exactly as the engine builds it (`role` None: the config's).
    `deferred_decodes` (the simulator's choice) changes how fast it runs, not what it decides."""
    policy = sagellm.kv_cache.policy(kv_block_bytes(shape, sagellm))
    kv = KVCacheManager(num_blocks, sagellm.kv_cache.block_size, policy)
    limit = min(max_model_len(shape, sagellm), kv.capacity_tokens)
    return Scheduler(kv, sagellm.scheduler.limits(limit, role), deferred_decodes=deferred_decodes,
                     policy=sagellm.scheduler.make_policy())


def build_cost_model(hardware: str, shape: ModelShape, sagellm: SageLLMConfig, base_dir: Path = Path(".")
                     ) -> tuple[CostModel, HardwareSpec | None]:
    """(cost model, roofline spec or None for a calibrated profile of this machine). A profile
    prices serving steps with the serving factors timed under the config's schedule mode, if it
    has them (`ProfiledCostModel.use_mode`)."""
    from simulator.cost.machine import find_local_profile, model_key
    from simulator.cost.profiled import ProfiledCostModel

    dtype = sagellm.model.dtype
    mode = sagellm.scheduler.schedule_mode.value
    path = Path(hardware)
    if hardware == "local":
        model = ProfiledCostModel.load(find_local_profile(shape, dtype, threads=sagellm.backend.num_threads))
        model.use_mode(mode)
        return model, None
    if path.suffix == ".json":
        if not path.is_absolute():
            path = base_dir / path
        if not path.exists():
            raise ConfigError(f"hardware: calibrated profile {str(path)!r} does not exist (run `sagellm calibrate`)")
        model = ProfiledCostModel.load(path)
        if model_key(model.shape) != model_key(shape) or model.dtype != dtype:
            raise ConfigError(
                f"hardware: profile {path.name} was calibrated for {model_key(model.shape)} in {model.dtype}, "
                f"but the simulation runs {model_key(shape)} in {dtype}; calibrate that model and dtype"
            )
        model.use_mode(mode)
        return model, None
    if path.suffix in (".yaml", ".yml") and not path.is_absolute():
        path = base_dir / path
    try:
        spec = load_spec(path)
        from simulator.cost.roofline import RooflineCostModel

        return RooflineCostModel(spec, shape, dtype), spec
    except HardwareError as exc:
        raise ConfigError(str(exc)) from exc
