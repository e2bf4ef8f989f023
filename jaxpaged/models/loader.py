"""Load HF safetensors checkpoints into our params pytree (sharded over a mesh, or random for
speed runs); save/restore converted params.

Each model family module gives `param_shapes(cfg)` (our layout) and `from_hf` / `to_hf`
(our params from HF tensors and back); loading reads every HF tensor once and casts it to
the serving dtype.
"""
from __future__ import annotations

import dataclasses
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
from jaxpaged.models.quantization import QuantizationConfig, load_quantization_config, quantize
from jaxpaged.models.quantization.checkpoint import read_quantized
from jaxpaged.models.sharding import placement, split_config, with_kernel_layouts

FLOAT8 = {"F8_E4M3": jnp.float8_e4m3fn, "F8_E5M2": jnp.float8_e5m2}  # safetensors dtype -> numpy (ml_dtypes)


def load_model(model_dir, dtype: str = "auto", load_format: str = "auto", mesh=None,
               quantization: str | None = None) -> tuple[ModelConfig, dict]:
    """Config and params of the HF checkpoint in `model_dir` (one-line `ConfigError` on failure).

    `load_format="dummy"` reads only config.json and makes random weights on the device.
    With a `mesh` (axis `tp`), each weight is sharded as its family's `partition_specs` say.
    `quantization` (vLLM's argument): None serves the checkpoint as stored (quantized or not);
    fp8 / int8 / int4 quantize a float checkpoint's layer weights; a checkpoint format's name
    must be the checkpoint's (models/quantization/config.py).
    """
    cfg = load_config(model_dir)
    quant = load_quantization_config(model_dir, quantization)
    place = None
    if mesh is not None:
        cfg = split_config(cfg, mesh.shape["tp"])
        place = placement(cfg, mesh)
    if load_format == "dummy":
        params = random_params(cfg, dtype, place=place, quant=quant)
    else:
        params = load_params(model_dir, cfg, dtype, place, quant)
    return cfg, params if mesh is None else with_kernel_layouts(params, cfg, mesh)


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


def tensor_files(model_dir: Path) -> dict[str, Path]:
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


def _read_float8(f: Path, name: str) -> np.ndarray:
    """A float8 tensor from a safetensors file (its numpy reader has no float8 dtypes): the JSON
    header gives the dtype, shape and byte range."""
    with open(f, "rb") as fh:
        header_len = int.from_bytes(fh.read(8), "little")
        meta = json.loads(fh.read(header_len))[name]
        start, end = meta["data_offsets"]
        fh.seek(8 + header_len + start)
        data = fh.read(end - start)
    return np.frombuffer(data, dtype=FLOAT8[meta["dtype"]]).reshape(meta["shape"])


def load_params(model_dir: str | Path, cfg: ModelConfig, dtype: str = "auto", place=None,
                quant: QuantizationConfig | None = None) -> dict:
    """Read the checkpoint in `model_dir` into our (nested) params pytree.

    Tensors are read and converted in host memory, then each param goes straight to its
    devices: `place(key, value, layer)` gives its sharding (None: the default device). With
    `quant`, a quantized module's tensors become one weight leaf (models/quantization), or a
    float layer weight is quantized (online).
    """
    model_dir = Path(model_dir)
    target = resolve_dtype(cfg, dtype)
    mod = family_module(cfg)
    files = tensor_files(model_dir)
    handles: dict[Path, object] = {}

    def raw(name: str):
        """Tensor `name` as stored."""
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
            if handles[f].get_slice(name).get_dtype() in FLOAT8:
                return _read_float8(f, name)
            return handles[f].get_tensor(name)
        except Exception as e:  # noqa: BLE001
            raise _unreadable(f, e) from None

    def get(name: str):
        """Tensor `name` in the serving dtype, or the leaf of a quantized module's `.weight`."""
        if quant is not None and not quant.online and name.endswith(".weight"):
            leaf = read_quantized(quant, name.removesuffix(".weight"), raw, files.__contains__)
            if leaf is not None:
                return leaf
        tensor = raw(name)
        if tensor.dtype in FLOAT8.values():
            raise ConfigError(f"tensor {name} is {tensor.dtype} with no weight_scale beside it")
        return tensor.astype(target)

    def read(key: str, shape: tuple[int, ...], layer: int | None):
        with jax.default_device(jax.local_devices(backend="cpu")[0]):
            t = mod.from_hf(cfg, key, layer, get)
            if quant is not None and quant.online and key in mod.QUANTIZABLE:
                t = quantize(t, quant.scheme)
        if t.shape != shape:
            raise ConfigError(f"param {key} of layer {layer} has shape {tuple(t.shape)}, expected {shape} "
                              "from config.json")
        if place is None:
            return jax.device_put(t, jax.devices()[0])
        # each device (of any process) takes its own slice of each array
        return jax.tree.map(lambda a, s: jax.make_array_from_callback(a.shape, s, np.asarray(a).__getitem__),
                            t, place(key, t, layer))

    return build_params(cfg, read)


def random_params(cfg: ModelConfig, dtype: str = "auto", seed: int = 0, place=None,
                  quant: QuantizationConfig | None = None) -> dict:
    """Random weights of `cfg`'s shapes made on their devices (vLLM's `load_format=dummy`): for
    speed runs of real architectures without carrying their checkpoints. `place` as in
    `load_params`; with `quant`, the layer weights are quantized as its scheme says."""
    target = resolve_dtype(cfg, dtype)
    key, counter = jax.random.PRNGKey(seed), itertools.count()
    quantizable = family_module(cfg).QUANTIZABLE

    def make(name: str, shape: tuple[int, ...], layer: int | None) -> jax.Array:
        ones = "norm" in name and not name.endswith("_b")
        scheme = (quant.scheme, quant.group_size) if quant is not None and name in quantizable else None
        value = jax.eval_shape(_init_fn(shape, target, ones, scheme), key)
        init = _random_init(shape, target, ones, scheme, place(name, value, layer) if place else None)
        return init(jax.random.fold_in(key, next(counter)))

    return build_params(cfg, make)


def _init_fn(shape: tuple[int, ...], dtype, ones: bool, scheme: tuple[str, int] | None):
    """key -> a random weight (ones for a norm scale), quantized as `scheme` (scheme, group size) says."""
    def init(key):
        if ones:
            return jnp.ones(shape, dtype)
        w = (0.02 * jax.random.normal(key, shape)).astype(dtype)
        return w if scheme is None else quantize(w, *scheme)

    return init


@functools.cache
def _random_init(shape: tuple[int, ...], dtype, ones: bool, scheme: tuple[str, int] | None, sharding):
    """A jitted initialiser per (shape, dtype, kind, scheme, sharding): each device makes its own shard."""
    return jax.jit(_init_fn(shape, dtype, ones, scheme), out_shardings=sharding)


def save_params(path: str | Path, params: dict) -> None:
    """Save converted params with orbax (fast restarts without re-converting)."""
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(Path(path).absolute(), params)


def restore_params(path: str | Path, cfg: ModelConfig, dtype: str = "auto", place=None,
                   quant: QuantizationConfig | None = None) -> dict:
    """Restore params saved by `save_params`, checked against the shapes `cfg` implies, each
    onto its devices (`place` as in `load_params`). `quant`: the quantization the saved layer
    weights are in (`load_quantization_config(model_dir, quantization)`, as `load_model` read
    it): they restore as its weight dataclasses, with the optional fields the saved ones have
    (act-order's row order `perm`, a static activation scale). A mismatch is a one-line `ConfigError`."""
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    target = resolve_dtype(cfg, dtype)
    quantizable = family_module(cfg).QUANTIZABLE
    with ocp.StandardCheckpointer() as ckptr:
        saved = ckptr.metadata(path).item_metadata.tree

        def abstract_param(key: str, shape: tuple[int, ...], layer: int | None):
            try:
                meta = saved[key] if layer is None else saved["layers"][layer][key.removeprefix("layers/")]
            except (KeyError, IndexError):
                raise ConfigError(f"the params saved at {path} have no {key} of layer {layer}") from None
            value = jax.ShapeDtypeStruct(shape, target)
            if quant is not None and key in quantizable:
                scheme = (quant.scheme, quant.group_size)
                value = _saved_weight(_abstract_quantized(shape, target, scheme), meta, f"{path}: {key} of layer {layer}")
            elif isinstance(meta, dict):
                raise ConfigError(f"the params saved at {path} hold {key} quantized: pass the quantization "
                                  "they were saved with")
            shardings = place(key, value, layer) if place else jax.tree.map(lambda _: None, value)
            return jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s), value, shardings)

        return ckptr.restore(path, build_params(cfg, abstract_param))


@functools.cache
def _abstract_quantized(shape: tuple[int, ...], dtype, scheme: tuple[str, int]):
    """The abstract weight `quantize` makes of a `shape` one (traced once per shape, not per layer)."""
    return jax.eval_shape(_init_fn(shape, dtype, False, scheme), jax.random.PRNGKey(0))


def _saved_weight(expected, meta, where: str):
    """The abstract quantized weight `expected` (its class, static fields and shapes) with the
    array fields the saved one has (orbax metadata `meta`: field -> array metadata or None)."""
    fields = {f.name: getattr(expected, f.name) for f in dataclasses.fields(expected) if not f.metadata.get("static")}
    if not isinstance(meta, dict) or set(meta) != set(fields):
        got = sorted(meta) if isinstance(meta, dict) else "a float array"
        raise ConfigError(f"{where} was saved as {got}, not as {type(expected).__name__} {sorted(fields)}")
    for name, want in fields.items():
        if meta[name] is not None and want is not None and tuple(meta[name].shape) != want.shape:
            raise ConfigError(f"{where}: field {name} was saved with shape {tuple(meta[name].shape)}, "
                              f"expected {want.shape}")
    return dataclasses.replace(expected, **{name: None if m is None else jax.ShapeDtypeStruct(tuple(m.shape), m.dtype)
                                            for name, m in meta.items()})
