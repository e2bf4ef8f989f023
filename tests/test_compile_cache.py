"""The persistent compilation cache that `LLM()` and the server's engine core use by default."""
from __future__ import annotations

import logging

import jax
import numpy as np
import pytest

from jaxpaged.engine.compile_cache import enable_compilation_cache, log_late_compiles


@pytest.fixture
def jax_cache_config():
    keys = ("jax_enable_compilation_cache", "jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    saved = {k: getattr(jax.config, k) for k in keys}
    yield
    for k, v in saved.items():
        jax.config.update(k, v)


def test_engines_cache_their_programs_under_jaxpaged_cache_by_default(tmp_path, monkeypatch, jax_cache_config):
    monkeypatch.setenv("JAXPAGED_CACHE", str(tmp_path))
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", None)
    assert enable_compilation_cache() == str(tmp_path / "xla")
    assert jax.config.jax_persistent_cache_min_compile_time_secs == 0  # every program, however fast
    # a directory set already (JAX_COMPILATION_CACHE_DIR, a benchmark's flag) is kept
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "mine"))
    assert enable_compilation_cache() == str(tmp_path / "mine")
    jax.config.update("jax_enable_compilation_cache", False)  # switched off: left off
    assert enable_compilation_cache() is None


def test_programs_lowered_after_warm_up_are_logged(caplog):
    """A jit cache miss after warm-up (here any new program, the threshold at 0 s) is logged;
    with the log off, nothing is."""
    log = logging.getLogger("test_late_compiles")
    with caplog.at_level(logging.WARNING, logger=log.name):
        log_late_compiles(None)
        jax.jit(lambda x: x * 3 + 1)(np.ones(5, np.float32))
        assert not caplog.records
        log_late_compiles(log, min_secs=0)
        try:
            jax.jit(lambda x: x * 5 - 2)(np.ones(7, np.float32))
        finally:
            log_late_compiles(None)
    assert any("lowered after warm-up" in r.getMessage() for r in caplog.records)
