"""The benchmark workloads of ../shared/DEVICE.md, shared by the offline and serving benchmarks."""
from __future__ import annotations

import numpy as np


def workload(args, vocab: int) -> tuple[list[list[int]], list[int]]:
    """`fixed`: N x input_len prompts, output_len each; `mixed`: lengths uniform in [min_len, max_len]
    (default_rng(seed): inputs drawn first, then outputs); random token ids below `vocab`."""
    rng = np.random.default_rng(args.seed)
    n = args.num_prompts
    if args.workload == "fixed":
        ins, outs = [args.input_len] * n, [args.output_len] * n
    else:
        ins = rng.integers(args.min_len, args.max_len + 1, n).tolist()
        outs = rng.integers(args.min_len, args.max_len + 1, n).tolist()
    prompts = [rng.integers(0, vocab, k).tolist() for k in ins]
    return prompts, outs
