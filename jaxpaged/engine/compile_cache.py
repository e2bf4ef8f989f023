"""Where jaxpaged keeps what outlives a process: the persistent XLA compilation cache (so a
restart, of the server or of `LLM()`, reuses the compiled steps) and the demo checkpoint."""
from __future__ import annotations

import concurrent.futures
import logging
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


LOWERING_EVENT = "/jax/core/compile/jaxpr_to_mlir_module_duration"  # jax's monitoring event
_late_compiles: dict = {"listening": False, "logger": None, "min_secs": 0.05}


def log_late_compiles(logger: logging.Logger | None, min_secs: float = 0.05) -> None:
    """Log (None: stop logging) each program lowered anew that took `min_secs` or more: a jit
    cache miss, whether XLA then compiles the program or loads it from the persistent cache.
    The engine turns it on after warm-up, where such a miss is a step shape the warm-up missed
    and stalls every stream. One listener per process."""
    from jax import monitoring

    def listen(event: str, duration: float, **_) -> None:
        if event == LOWERING_EVENT and duration >= _late_compiles["min_secs"] and (log := _late_compiles["logger"]):
            log.warning("a program was lowered after warm-up (%.2f s): a step shape the warm-up missed", duration)

    if not _late_compiles["listening"]:
        monitoring.register_event_duration_secs_listener(listen)
        _late_compiles["listening"] = True
    _late_compiles.update(logger=logger, min_secs=min_secs)


def in_parallel(threads: int | None, fn, items: list) -> list:
    """`fn` over `items` in `threads` threads (default: one per core; XLA compiles outside the GIL)."""
    with concurrent.futures.ThreadPoolExecutor(threads or os.cpu_count()) as pool:
        return list(pool.map(fn, items))
