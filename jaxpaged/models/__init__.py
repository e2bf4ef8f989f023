"""Model families as pure functions: `forward(params, kv, step_input, cfg, attention)` ->
(hidden [T, H], kv) and `compute_logits(params, hidden_rows, cfg)` -> logits."""
from __future__ import annotations

from jaxpaged.models.config import ConfigError, ModelConfig, load_config
from jaxpaged.models.family import build_params, family_module, make_forward, param_specs
from jaxpaged.models.loader import load_model

__all__ = ["ConfigError", "ModelConfig", "build_params", "family_module", "load_config", "load_model",
           "make_forward", "param_specs"]
