"""The model families behind one interface. A family module (`llama`, `opt`) gives
`param_shapes(cfg)` and `partition_specs(cfg)` (flat dicts keyed alike), `QUANTIZABLE` (the keys
online quantization quantizes), `from_hf` / `to_hf`,
`forward(params, kv, step_input, cfg, attention)` -> (hidden [T, H], kv) and
`compute_logits(params, hidden_rows, cfg)` -> logits; here its flat keys become the params
tree and the partition-spec tree parallel to it."""
from __future__ import annotations

from types import ModuleType

import jax

from jaxpaged.models import llama, opt
from jaxpaged.models.config import ModelConfig
from jaxpaged.models.quantization import QuantizedWeight, leaf_specs


def family_module(cfg: ModelConfig) -> ModuleType:
    """The module (`llama` or `opt`) that implements `cfg`'s architecture."""
    return {"llama": llama, "opt": opt}[cfg.family]


def build_params(cfg: ModelConfig, make) -> dict:
    """The params tree of `cfg`'s family with leaves `make(key, shape, layer)`.

    Top-level keys map to leaves; `params["layers"]` is a list of per-layer dicts (keys
    without the `layers/` prefix), with `layer` the index (None for top-level keys).
    """
    shapes = family_module(cfg).param_shapes(cfg)
    tree = {k: make(k, s, None) for k, s in shapes.items() if not k.startswith("layers/")}
    tree["layers"] = [{k.removeprefix("layers/"): make(k, s, i) for k, s in shapes.items() if k.startswith("layers/")}
                      for i in range(cfg.num_layers)]
    return tree


def param_specs(cfg: ModelConfig, params: dict | None = None) -> dict:
    """The tree of `PartitionSpec`s over mesh axis `tp`, parallel to the params tree (to
    `params`' own, whose quantized leaves get a spec per field)."""
    specs = family_module(cfg).partition_specs(cfg)
    tree = build_params(cfg, lambda key, shape, layer: specs[key])
    if params is None:
        return tree
    return jax.tree.map(leaf_specs, params, tree, is_leaf=lambda v: isinstance(v, QuantizedWeight))


def make_forward(cfg: ModelConfig, attention):
    """Jitted `forward(params, kv, step_input) -> (logits at logits_index, kv)`, KV pool donated."""
    family = family_module(cfg)

    def fwd(params, kv, inp):
        hidden, kv = family.forward(params, kv, inp, cfg, attention)
        return family.compute_logits(params, hidden[inp.logits_index], cfg), kv

    return jax.jit(fwd, donate_argnums=1)
