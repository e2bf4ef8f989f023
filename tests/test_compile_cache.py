"""The persistent compilation cache that `LLM()` and the server's engine core use by default."""
from __future__ import annotations

import jax
import pytest

from jaxpaged.engine.compile_cache import enable_compilation_cache


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
