"""Model families as pure functions: `forward(params, kv, step_input, cfg, attention)`."""
from __future__ import annotations

from types import ModuleType

from jaxpaged.models.config import ConfigError, ModelConfig, load_config


def family_module(cfg: ModelConfig) -> ModuleType:
    """The module (`llama` or `opt`) that implements `cfg`'s architecture."""
    from jaxpaged.models import llama, opt

    return {"llama": llama, "opt": opt}[cfg.family]


def make_forward(cfg: ModelConfig, attention):
    """Jitted `forward(params, kv, step_input) -> (logits, kv)` with the KV pool donated."""
    import functools

    import jax

    fwd = functools.partial(family_module(cfg).forward, cfg=cfg, attention=attention)
    return jax.jit(fwd, donate_argnums=1)


def load_model(model_dir, dtype: str = "auto", load_format: str = "auto") -> tuple[ModelConfig, dict]:
    """Config and params of the HF checkpoint in `model_dir` (one-line `ConfigError` on failure).

    `load_format="dummy"` reads only config.json and makes random weights on the device.
    """
    from jaxpaged.models.loader import load_params, random_params

    cfg = load_config(model_dir)
    if load_format == "dummy":
        return cfg, random_params(cfg, dtype)
    return cfg, load_params(model_dir, cfg, dtype)


__all__ = ["ConfigError", "ModelConfig", "family_module", "load_config", "load_model"]
