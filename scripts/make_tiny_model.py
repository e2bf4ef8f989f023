"""Write a tiny random-weight HF checkpoint (config, safetensors, tokenizer), offline.

    python scripts/make_tiny_model.py OUT_DIR [--variant llama] [--num-shards 1] [--seed 0]
"""
from __future__ import annotations

import argparse

from jaxpaged.models.tiny import VARIANTS, make_tiny_model

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir")
    ap.add_argument("--variant", default="llama", choices=list(VARIANTS))
    ap.add_argument("--num-shards", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    print(make_tiny_model(a.out_dir, a.variant, seed=a.seed, num_shards=a.num_shards))
