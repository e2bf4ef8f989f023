"""Load HF safetensors checkpoints into our params pytree (sharded over a mesh, or random for
speed runs); save/restore converted params.

Each model family module gives `param_shapes(cfg)` (our layout) and `from_hf` / `to_hf`
(our params from HF tensors and back); loading reads every HF tensor once and casts it to
the serving dtype.
"""
from __future__ import annotations

import functools
import itertools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open

from jaxpaged.models.config import DTYPES, ConfigError, ModelConfig, load_config
from jaxpaged.models.family import build_params, family_module
from jaxpaged.models.sharding import placement, split_config


def load_model(model_dir, dtype: str = "auto", load_format: str = "auto", mesh=None) -> tuple[ModelConfig, dict]:
    """Config and params of the HF checkpoint in `model_dir` (one-line `ConfigError` on failure).

    `load_format="dummy"` reads only config.json and makes random weights on the device.
    With a `mesh` (axis `tp`), each weight is sharded as its family's `partition_specs` say.
    """
    cfg = load_config(model_dir)
    place = None
    if mesh is not None:
        cfg = split_config(cfg, mesh.shape["tp"])
        place = placement(cfg, mesh)
    if load_format == "dummy":
        return cfg, random_params(cfg, dtype, place=place)
    return cfg, load_params(model_dir, cfg, dtype, place)


def resolve_dtype(cfg: ModelConfig, dtype: str) -> jnp.dtype:
    """`auto` keeps the checkpoint's dtype; otherwise one of float32, bfloat16, float16."""
    name = cfg.dtype if dtype == "auto" else dtype
    if name not in DTYPES:
        raise ConfigError(f"unsupported dtype {dtype!r}; choose auto, bfloat16, float16 or float32")
    return jnp.dtype(name)


def _unreadable(f: Path, e: Exception) -> ConfigError:
    """A corrupt or truncated weights file, in one line naming it."""
    reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return ConfigError(f"cannot read weights file {f}: {reason} (corrupt or truncated?)")


def _tensor_files(model_dir: Path) -> dict[str, Path]:
    """HF tensor name -> safetensors file, from the sharded index or by listing the files."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: model_dir / f for name, f in weight_map.items()}
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"no *.safetensors files in {model_dir}")
    out = {}
    for f in files:
        try:
            with safe_open(f, framework="numpy") as st:
                out |= {name: f for name in st.keys()}
        except Exception as e:  # noqa: BLE001 - safetensors' own error types, OSError
            raise _unreadable(f, e) from None
    return out


def load_params(model_dir: str | Path, cfg: ModelConfig, dtype: str = "auto", place=None) -> dict:
    """Read the checkpoint in `model_dir` into our (nested) params pytree.

    Tensors are read and converted in host memory, then each param goes straight to its
    devices: `place(key, shape, layer)` gives its sharding (None: the default device).
    """
    model_dir = Path(model_dir)
    target = resolve_dtype(cfg, dtype)
    mod = family_module(cfg)
    files = _tensor_files(model_dir)
    handles: dict[Path, object] = {}

    def get(name: str) -> jax.Array:
        if name not in files:
            raise ConfigError(f"checkpoint {model_dir} is missing tensor {name}")
        f = files[name]
        if f not in handles:
            if not f.is_file():
                raise ConfigError(f"checkpoint file {f} listed in the index does not exist")
            try:
                handles[f] = safe_open(f, framework="flax")
            except Exception as e:  # noqa: BLE001
                raise _unreadable(f, e) from None
        try:
            tensor = handles[f].get_tensor(name)
        except Exception as e:  # noqa: BLE001
            raise _unreadable(f, e) from None
        return tensor.astype(target)

    def read(key: str, shape: tuple[int, ...], layer: int | None) -> jax.Array:
        with jax.default_device(jax.local_devices(backend="cpu")[0]):
            t = mod.from_hf(cfg, key, layer, get)
        if t.shape != shape:
            raise ConfigError(f"param {key} of layer {layer} has shape {tuple(t.shape)}, expected {shape} "
                              "from config.json")
        if place is None:
            return jax.device_put(t, jax.devices()[0])
        host = np.asarray(t)  # each device (of any process) takes its own slice
        return jax.make_array_from_callback(shape, place(key, shape, layer), lambda index: host[index])

    return build_params(cfg, read)


def random_params(cfg: ModelConfig, dtype: str = "auto", seed: int = 0, place=None) -> dict:
    """Random weights of `cfg`'s shapes made on their devices (vLLM's `load_format=dummy`): for
    speed runs of real architectures without carrying their checkpoints. `place` as in
    `load_params`."""
    target = resolve_dtype(cfg, dtype)
    key, counter = jax.random.PRNGKey(seed), itertools.count()

    def make(name: str, shape: tuple[int, ...], layer: int | None) -> jax.Array:
        ones = "norm" in name and not name.endswith("_b")
        init = _random_init(shape, target, ones, place(name, shape, layer) if place else None)
        return init(jax.random.fold_in(key, next(counter)))

    return build_params(cfg, make)


@functools.cache
def _random_init(shape: tuple[int, ...], dtype, ones: bool, sharding):
    """A jitted initialiser per (shape, dtype, kind, sharding): each device makes its own shard."""
    def init(key):
        return jnp.ones(shape, dtype) if ones else (0.02 * jax.random.normal(key, shape)).astype(dtype)

    return jax.jit(init, out_shardings=sharding)


def save_params(path: str | Path, params: dict) -> None:
    """Save converted params with orbax (fast restarts without re-converting)."""
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(Path(path).absolute(), params)


def restore_params(path: str | Path, cfg: ModelConfig, dtype: str = "auto", place=None) -> dict:
    """Restore params saved by `save_params`, checked against the shapes `cfg` implies, each
    onto its devices (`place` as in `load_params`)."""
    import orbax.checkpoint as ocp

    target = resolve_dtype(cfg, dtype)
    abstract = build_params(cfg, lambda key, shape, layer: jax.ShapeDtypeStruct(
        shape, target, sharding=place(key, shape, layer) if place else None))
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(Path(path).absolute(), abstract)
