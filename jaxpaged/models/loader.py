"""Load HF safetensors checkpoints into our params pytree; save/restore converted params.

Each model family module gives `param_shapes(cfg)` (our layout) and `hf_name(key, layer)`;
loading reads every HF tensor once, transposes linear weights to `[in, out]`, stacks
layers and casts to the serving dtype.
"""
from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
from safetensors import safe_open

from jaxpaged.models import family_module
from jaxpaged.models.config import DTYPES, ConfigError, ModelConfig

NOT_TRANSPOSED = {"embed", "pos_embed"}  # stored [rows, dim] by HF as by us; other 2-D are linears


def resolve_dtype(cfg: ModelConfig, dtype: str) -> jnp.dtype:
    """`auto` keeps the checkpoint's dtype; otherwise one of float32, bfloat16, float16."""
    name = cfg.dtype if dtype == "auto" else dtype
    if name not in DTYPES:
        raise ConfigError(f"unsupported dtype {dtype!r}; choose auto, bfloat16, float16 or float32")
    return jnp.dtype(name)


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
        with safe_open(f, framework="numpy") as st:
            out |= {name: f for name in st.keys()}
    return out


def unflatten(flat: dict[str, jax.Array]) -> dict:
    """{'layers/wq': a} -> {'layers': {'wq': a}}."""
    tree: dict = {}
    for key, val in flat.items():
        *parents, leaf = key.split("/")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = val
    return tree


def load_params(model_dir: str | Path, cfg: ModelConfig, dtype: str = "auto") -> dict:
    """Read the checkpoint in `model_dir` into our (nested) params pytree."""
    model_dir = Path(model_dir)
    target = resolve_dtype(cfg, dtype)
    mod = family_module(cfg)
    files = _tensor_files(model_dir)
    handles: dict[Path, object] = {}

    def read(name: str, shape: tuple[int, ...], transpose: bool) -> jax.Array:
        if name not in files:
            raise ConfigError(f"checkpoint {model_dir} is missing tensor {name}")
        f = files[name]
        if f not in handles:
            if not f.is_file():
                raise ConfigError(f"checkpoint file {f} listed in the index does not exist")
            handles[f] = safe_open(f, framework="flax")
        t = handles[f].get_tensor(name).astype(target)
        t = t.T if transpose else t
        if t.shape != shape:
            raise ConfigError(f"tensor {name} has shape {tuple(t.shape)}, expected {shape} from config.json")
        return t

    flat = {}
    for key, shape in mod.param_shapes(cfg).items():
        transpose = len(shape) - key.startswith("layers/") == 2 and key not in NOT_TRANSPOSED
        if key.startswith("layers/"):
            flat[key] = jnp.stack([read(mod.hf_name(key, i), shape[1:], transpose) for i in range(cfg.num_layers)])
        else:
            flat[key] = read(mod.hf_name(key, None), shape, transpose)
    return unflatten(flat)


def random_params(cfg: ModelConfig, dtype: str = "auto", seed: int = 0) -> dict:
    """Random weights of `cfg`'s shapes, made on the default device (vLLM's `load_format=dummy`):
    for speed runs of real architectures without carrying their checkpoints."""
    target = resolve_dtype(cfg, dtype)
    key = jax.random.PRNGKey(seed)
    flat = {}
    for i, (name, shape) in enumerate(family_module(cfg).param_shapes(cfg).items()):
        if "norm" in name and not name.endswith("_b"):
            flat[name] = jnp.ones(shape, target)
        else:
            flat[name] = (0.02 * jax.random.normal(jax.random.fold_in(key, i), shape, jnp.float32)).astype(target)
    return unflatten(flat)


def save_params(path: str | Path, params: dict) -> None:
    """Save converted params with orbax (fast restarts without re-converting)."""
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(Path(path).absolute(), params)


def restore_params(path: str | Path, cfg: ModelConfig, dtype: str = "auto") -> dict:
    """Restore params saved by `save_params`, checked against the shapes `cfg` implies."""
    import orbax.checkpoint as ocp

    target = resolve_dtype(cfg, dtype)
    shapes = family_module(cfg).param_shapes(cfg)
    abstract = unflatten({k: jax.ShapeDtypeStruct(s, target) for k, s in shapes.items()})
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(Path(path).absolute(), abstract)

