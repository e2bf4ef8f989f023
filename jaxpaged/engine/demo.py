"""The built-in demo model: a tiny random-weight Llama, built offline on first use and cached."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from jaxpaged.engine.compile_cache import cache_root

DEMO_NAME = "jaxpaged-demo"
# Small engine settings so the demo starts fast on a CPU (its max_position_embeddings is 256):
# three step sizes, so 18 programs to compile instead of 26.
DEMO_DEFAULTS = {"max_model_len": 256, "max_num_batched_tokens": 256, "max_num_seqs": 64,
                 "token_buckets": (16, 64, 256)}


def demo_dir() -> Path:
    """Where the demo checkpoint is (or will be) built."""
    return cache_root() / "demo-llama"


def demo_model_dir() -> Path:
    """The demo checkpoint's directory, building it if needed (atomically: safe to race)."""
    out = demo_dir()
    if not (out / "config.json").is_file():
        from jaxpaged.models.tiny import make_tiny_model  # imports JAX: only the engine core builds it

        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix="demo-llama.", dir=out.parent))
        make_tiny_model(tmp, "llama")
        try:
            tmp.rename(out)
        except OSError:  # another process won the race
            shutil.rmtree(tmp, ignore_errors=True)
    return out
