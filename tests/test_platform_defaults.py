"""The engine sizes left unset are filled per platform: smaller on a CPU (logged), the GPU's
otherwise; a value the user set, by `LLM(...)` keyword or by flag, always wins. No engine is
started here."""
from __future__ import annotations

import logging

import jax
import pytest

from jaxpaged.engine.arg_utils import create_engine_config
from jaxpaged.engine.config import EngineConfig
from jaxpaged.engine.platform_defaults import set_default_args
from jaxpaged.serve.cli import engine_config
from jaxpaged.serve.cli_args import make_parser

SIZES = ("max_model_len", "max_num_seqs", "max_num_batched_tokens", "token_buckets")
CPU = {"max_model_len": 4096, "max_num_seqs": 16, "max_num_batched_tokens": 256, "token_buckets": (16, 64, 256)}


def sizes(config: EngineConfig) -> tuple:
    return tuple(getattr(config, name) for name in SIZES)


def cpu_logs(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("CPU defaults:")]


def test_cpu_fills_the_unset_sizes_small_and_says_so(caplog):
    assert jax.default_backend() == "cpu"
    with caplog.at_level(logging.INFO, logger="jaxpaged"):
        config = set_default_args(EngineConfig(model="m"), max_position_embeddings=8192)
    assert dict(zip(SIZES, sizes(config))) == CPU
    [log] = cpu_logs(caplog)
    assert "max_model_len=4096, max_num_seqs=16, max_num_batched_tokens=256, token_buckets=(16, 64, 256)" in log
    assert "cpu_kv_cache_bytes=1073741824" in log and "the model allows max_model_len 8192" in log
    # a model with a shorter context keeps its own
    assert set_default_args(EngineConfig(model="m"), max_position_embeddings=256).max_model_len == 256


def test_cpu_buckets_follow_an_explicit_budget():
    config = set_default_args(EngineConfig(model="m", max_num_batched_tokens=1000), max_position_embeddings=8192)
    assert sizes(config) == (4096, 16, 1000, (16, 64, 256, 1000))


EXPLICIT = {"max_model_len": 8192, "max_num_seqs": 256, "max_num_batched_tokens": 2048, "token_buckets": (8, 24)}


@pytest.mark.parametrize("name", list(EXPLICIT))
def test_an_explicit_size_wins_over_the_cpu_default(name, caplog):
    """Each size set alone (at the GPU's default value, or a value of its own), through `LLM`'s
    keywords and through the CLI's flag: it stays; the others get the CPU's, and only those
    are logged."""
    value = EXPLICIT[name]
    text = ",".join(map(str, value)) if name == "token_buckets" else str(value)
    args = make_parser().parse_args(["--model", "m", f"--{name.replace('_', '-')}", text])
    want = {**CPU, name: value}
    if name == "max_num_batched_tokens":  # the CPU's buckets, up to this budget
        want["token_buckets"] = (16, 64, 256, 1024, 2048)
    for config in (create_engine_config("m", {name: value}, resolve=False), engine_config(args, "m", {}, resolve=False)):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="jaxpaged"):
            filled = set_default_args(config, max_position_embeddings=8192)
        assert dict(zip(SIZES, sizes(filled))) == want
        [log] = cpu_logs(caplog)
        assert f"{name}=" not in log


def test_nothing_logged_when_every_size_is_set(caplog):
    config = EngineConfig(model="m", **EXPLICIT)
    with caplog.at_level(logging.INFO, logger="jaxpaged"):
        assert set_default_args(config, max_position_embeddings=8192) == config
    assert not cpu_logs(caplog)


def test_gpu_defaults_are_unchanged_off_the_cpu(monkeypatch, caplog):
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    with caplog.at_level(logging.INFO, logger="jaxpaged"):
        config = set_default_args(EngineConfig(model="m"), max_position_embeddings=8192)
    # the model's whole context, 256 seats, a 2048-token budget, the bucket rule of buckets.token_buckets
    assert sizes(config) == (8192, 256, 2048, None)
    assert not cpu_logs(caplog)
