"""Shared fixtures: tiny HF checkpoints made offline, once per test session."""
from __future__ import annotations

import gc
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# LLVM at -O0 for XLA's CPU code, here and in the servers and scripts the tests start: the suite
# is mostly compiles of tiny models (-O0 takes the suite from 955 to 824 s on 2 cores); the
# programs compute the same, only slower to run.
os.environ["XLA_FLAGS"] = " ".join(filter(None, [os.environ.get("XLA_FLAGS"),
                                                 "--xla_backend_optimization_level=0"]))

import jax
import pytest

# 8 fake CPU devices for the tensor-parallel tests (before any JAX work); everything else
# runs on device 0 as it would on a single-device machine.
jax.config.update("jax_num_cpu_devices", 8)
# No persistent compilation cache in this process: a program loaded from it is no compile
# event, so the no-recompile tests could not see it (engines started by default use one).
jax.config.update("jax_enable_compilation_cache", False)

from jaxpaged.models.tiny import make_tiny_model


def _num_memory_maps() -> int:
    try:
        with open("/proc/self/maps") as f:
            return sum(1 for _ in f)
    except OSError:  # not Linux
        return 0


@pytest.fixture(scope="module", autouse=True)
def _release_compiled_programs():
    """After each test module, drop the engines of its fixtures and, past 30,000 memory maps,
    the jit caches: XLA's CPU code lives in maps, and one pytest process holding every
    module's programs reached the kernel's vm.max_map_count (65,530), where a compile fails
    and the process aborts or hangs. (Clearing after every module costs 3 minutes of
    recompiles; one module adds at most ~23,000 maps.) Every engine start froze the heap
    (`freeze_gc_heap`): unfrozen first, so the collector sees the module's engines again."""
    yield
    gc.unfreeze()
    gc.collect()
    if _num_memory_maps() > 30_000:
        jax.clear_caches()
        gc.collect()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """`tiny_model_dir(variant, num_shards=1)` -> path of a cached tiny checkpoint."""
    made: dict = {}

    def make(variant: str = "llama", num_shards: int = 1):
        key = (variant, num_shards)
        if key not in made:
            made[key] = make_tiny_model(tmp_path_factory.mktemp(f"{variant}-{num_shards}"), variant,
                                        num_shards=num_shards)
        return made[key]

    return make


class CompileCounter:
    """Counts XLA backend compiles in this process (every jit cache miss, eager ops included)."""

    EVENT = "/jax/core/compile/backend_compile_duration"

    def __init__(self):
        import jax

        self.count = 0
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, event: str, duration: float, **kwargs) -> None:
        if event == self.EVENT:
            self.count += 1


@pytest.fixture(scope="session")
def compile_counter():
    return CompileCounter()
