"""What every model family shares: each matmul with a weight goes through `layers.linear`, and
the partition specs form a tree parallel to the params."""
from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import pytest
from _jaxprs import dot_generals
from jax.sharding import PartitionSpec as P

from jaxpaged.engine.mesh import make_mesh
from jaxpaged.models import family_module, load_model, param_specs
from jaxpaged.models import layers
from jaxpaged.models.kv_cache import init_kv_cache
from jaxpaged.models.step_input import make_step_input
from jaxpaged.models.tiny import VARIANTS


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_matmul_goes_through_linear(variant, tiny_model_dir, monkeypatch):
    """Count `linear` calls while tracing a forward and the LM head: the expected number per
    layer times the layers plus the head's, and as many as the dot_generals the trace holds
    (attention stubbed out: its dots are the kernel's, not a weight's)."""
    cfg, params = load_model(tiny_model_dir(variant))
    original, calls = layers.linear, []

    def counting(x, w, b=None):
        calls.append(w.shape)
        return original(x, w, b)

    for name, mod in list(sys.modules.items()):  # every module of the models that bound the name
        if name.startswith("jaxpaged.models") and getattr(mod, "linear", None) is original:
            monkeypatch.setattr(mod, "linear", counting)

    family = family_module(cfg)
    kv = init_kv_cache(cfg, 8, 4, jnp.float32)
    inp = make_step_input([([1, 2, 3], 0, [1]), ([4], 2, [2])], 4, 8, 2, 2)

    def attention(q, *args, **kwargs):
        return q

    def step(params, kv, inp):
        hidden, kv = family.forward(params, kv, inp, cfg, attention)
        return family.compute_logits(params, hidden[inp.logits_index], cfg)

    with jax.disable_jit():  # trace every layer anew (no cached nested jit)
        jaxpr = jax.make_jaxpr(step)(params, kv, inp)
    if cfg.family == "llama":  # wqkv, wo, w_gate_up, w_down; the LM head
        expected = 4 * cfg.num_layers + 1
    else:  # q, k, v, out, fc1, fc2; the LM head, and the projections in and out of the embedding width
        expected = 6 * cfg.num_layers + 1 + 2 * ("project_in" in params)
    assert len(calls) == expected, calls
    assert sum(1 for _ in dot_generals(jaxpr.jaxpr)) == expected


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_partition_specs_are_a_tree_parallel_to_the_params(variant, tiny_model_dir):
    cfg, params = load_model(tiny_model_dir(variant))
    specs = param_specs(cfg)
    assert jax.tree.structure(specs) == jax.tree.structure(params)
    for spec, w in zip(jax.tree.leaves(specs), jax.tree.leaves(params)):
        assert isinstance(spec, P) and len(spec) <= w.ndim, (spec, w.shape)


def test_sharded_params_follow_the_spec_tree(tiny_model_dir):
    cfg, params = load_model(tiny_model_dir("llama-tp"), mesh=make_mesh(2))
    got = jax.tree.map(lambda w: w.sharding.spec, params)
    assert got == param_specs(cfg)
    assert any("tp" in spec for spec in jax.tree.leaves(got))
