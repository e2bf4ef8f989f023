"""Checkpoint loading: sharded safetensors, clear one-line errors, dtype, orbax round trip (float and
quantized params)."""
from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jaxpaged.models import ConfigError, load_model
from jaxpaged.models.loader import restore_params, save_params


def assert_same_params(a, b):
    flat_a, flat_b = jax.tree.leaves_with_path(a), jax.tree.leaves_with_path(b)
    assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
    for (_, x), (_, y) in zip(flat_a, flat_b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_sharded_checkpoint_loads_same_params(tiny_model_dir):
    sharded = tiny_model_dir("qwen2", num_shards=3)
    assert len(list(sharded.glob("model-*-of-00003.safetensors"))) == 3
    assert (sharded / "model.safetensors.index.json").is_file()
    _, a = load_model(tiny_model_dir("qwen2"))
    _, b = load_model(sharded)
    assert_same_params(a, b)


def test_dtype_cast_and_orbax_round_trip(tiny_model_dir, tmp_path):
    cfg, params = load_model(tiny_model_dir("llama"), dtype="bfloat16")
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype("bfloat16")}
    save_params(tmp_path / "ckpt", params)
    restored = restore_params(tmp_path / "ckpt", cfg, dtype="bfloat16")
    assert_same_params(params, restored)


@pytest.mark.parametrize("fmt", ["int4", "gptq-act-order", "ct-fp8-static"])
def test_quantized_params_orbax_round_trip(fmt, tiny_model_dir, tmp_path):
    """Online int4, and checkpoints whose weights carry optional fields (act-order's g_idx, a
    static fp8 activation scale), restore as their weight dataclasses, every array equal; the
    wrong quantization, or none, is a one-line error naming what was saved."""
    from _quant_checkpoints import write_quantized

    from jaxpaged.models.quantization import QuantizationConfig, load_quantization_config

    src = tiny_model_dir("llama")
    model, online = (src, fmt) if fmt == "int4" else (write_quantized(src, tmp_path, fmt)[0], None)
    cfg, params = load_model(model, quantization=online)
    save_params(tmp_path / "ckpt", params)
    assert_same_params(params, restore_params(tmp_path / "ckpt", cfg, quant=load_quantization_config(model, online)))
    assert jax.tree.structure(params) != jax.tree.structure(load_model(src)[1])  # quantized leaves
    for quant, match in [(None, "hold layers/wqkv quantized: pass the quantization"),
                         (QuantizationConfig("int8", "int8", online=True), "was saved as .* not as Int8Weight")]:
        with pytest.raises(ConfigError, match=match) as e:
            restore_params(tmp_path / "ckpt", cfg, quant=quant)
        assert "\n" not in str(e.value)


def one_line_error(path, match):
    with pytest.raises(ConfigError, match=match) as e:
        load_model(path)
    assert "\n" not in str(e.value)


def test_bad_path_is_one_line_error(tmp_path):
    one_line_error(tmp_path / "nope", "model directory not found")
    one_line_error(tmp_path, "no config.json")


def test_unsupported_architecture_is_named(tiny_model_dir, tmp_path):
    d = shutil.copytree(tiny_model_dir("llama"), tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["MambaForCausalLM"]
    (d / "config.json").write_text(json.dumps(cfg))
    one_line_error(d, "unsupported architecture MambaForCausalLM")


def test_missing_tensor_is_named(tiny_model_dir, tmp_path):
    d = shutil.copytree(tiny_model_dir("llama"), tmp_path / "m")
    tensors = load_file(d / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    one_line_error(d, "missing tensor model.layers.1.mlp.up_proj.weight")


def test_missing_shard_file_is_named(tiny_model_dir, tmp_path):
    d = shutil.copytree(tiny_model_dir("qwen2", num_shards=3), tmp_path / "m")
    (d / "model-00002-of-00003.safetensors").unlink()
    one_line_error(d, "model-00002-of-00003.safetensors")


def test_no_weights_is_named(tiny_model_dir, tmp_path):
    d = shutil.copytree(tiny_model_dir("llama"), tmp_path / "m")
    (d / "model.safetensors").unlink()
    one_line_error(d, r"no \*.safetensors files")


def test_a_truncated_weights_file_is_one_line_naming_it(tiny_model_dir, tmp_path):
    """A corrupt or truncated safetensors file: a one-line ConfigError naming the file, from
    `LLM()` and from the server's command line (a usage error, no traceback)."""
    import subprocess
    import sys

    from jaxpaged import LLM
    from jaxpaged.models.config import ConfigError

    model = tmp_path / "broken"
    shutil.copytree(tiny_model_dir("llama"), model)
    weights = next(model.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ConfigError) as e:
        LLM(str(model), max_model_len=64, num_kv_blocks=16)
    assert str(weights) in str(e.value) and "\n" not in str(e.value)
    run = subprocess.run([sys.executable, "-m", "jaxpaged.serve", str(model), "--max-model-len", "64"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-2000:]
    assert f"cannot read weights file {weights}" in run.stderr.strip().splitlines()[-1]
