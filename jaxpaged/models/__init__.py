"""Model families as pure functions: `forward(params, kv, step_input, cfg, attention)` ->
(hidden [T, H], kv) and `compute_logits(params, hidden_rows, cfg)` -> logits."""
from __future__ import annotations

from types import ModuleType

from jaxpaged.models.config import ConfigError, ModelConfig, load_config


def family_module(cfg: ModelConfig) -> ModuleType:
    """The module (`llama` or `opt`) that implements `cfg`'s architecture."""
    from jaxpaged.models import llama, opt

    return {"llama": llama, "opt": opt}[cfg.family]


def build_params(cfg: ModelConfig, make) -> dict:
    """The params tree of `cfg`'s family with leaves `make(key, shape, layer)`.

    Top-level keys map to arrays; `params["layers"]` is a list of per-layer dicts (keys
    without the `layers/` prefix), with `layer` the index (None for top-level keys).
    """
    shapes = family_module(cfg).param_shapes(cfg)
    tree = {k: make(k, s, None) for k, s in shapes.items() if not k.startswith("layers/")}
    tree["layers"] = [{k.removeprefix("layers/"): make(k, s, i) for k, s in shapes.items() if k.startswith("layers/")}
                      for i in range(cfg.num_layers)]
    return tree


def make_forward(cfg: ModelConfig, attention):
    """Jitted `forward(params, kv, step_input) -> (logits at logits_index, kv)`, KV pool donated."""
    import jax

    family = family_module(cfg)

    def fwd(params, kv, inp):
        hidden, kv = family.forward(params, kv, inp, cfg, attention)
        return family.compute_logits(params, hidden[inp.logits_index], cfg), kv

    return jax.jit(fwd, donate_argnums=1)


def load_model(model_dir, dtype: str = "auto", load_format: str = "auto", mesh=None) -> tuple[ModelConfig, dict]:
    """Config and params of the HF checkpoint in `model_dir` (one-line `ConfigError` on failure).

    `load_format="dummy"` reads only config.json and makes random weights on the device.
    With a `mesh` (axis `tp`), each weight is sharded as its family's `partition_specs` say.
    """
    from jaxpaged.models.loader import load_params, random_params
    from jaxpaged.parallel import placement, split_config

    cfg = load_config(model_dir)
    place = None
    if mesh is not None:
        cfg = split_config(cfg, mesh.shape["tp"])
        place = placement(cfg, mesh)
    if load_format == "dummy":
        return cfg, random_params(cfg, dtype, place=place)
    return cfg, load_params(model_dir, cfg, dtype, place)


__all__ = ["ConfigError", "ModelConfig", "build_params", "family_module", "load_config", "load_model"]
