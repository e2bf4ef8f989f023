"""Where jaxpaged keeps what outlives a process: the persistent XLA compilation cache (so a
restart, of the server or of `LLM()`, reuses the compiled steps) and the demo checkpoint."""
from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """`$JAXPAGED_CACHE`, or `~/.cache/jaxpaged`."""
    return Path(os.environ.get("JAXPAGED_CACHE") or Path.home() / ".cache" / "jaxpaged").expanduser()


def enable_compilation_cache() -> str | None:
    """Point JAX's persistent compilation cache at `cache_root()/xla` unless a directory is set
    already (`JAX_COMPILATION_CACHE_DIR`, `jax.config`, a benchmark's --compilation-cache) or
    the cache is switched off (`jax_enable_compilation_cache`, as the tests do). Every program
    is cached, however fast it compiled. Returns the directory in use."""
    import jax

    if not jax.config.jax_enable_compilation_cache:
        return None
    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", str(cache_root() / "xla"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return jax.config.jax_compilation_cache_dir
