"""The benchmark workloads (docs/benchmarks.md, "Method"), shared by the offline and serving benchmarks."""
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


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="Print the token counts of the benchmark workloads (the scripts' defaults).")
    ap.add_argument("--vocab", type=int, default=128256)
    vocab = ap.parse_args().vocab
    for name in ("fixed", "mixed"):
        a = argparse.Namespace(workload=name, seed=0, num_prompts=256, input_len=512, output_len=256, min_len=16,
                               max_len=1024)
        prompts, outs = workload(a, vocab)
        print(f"{name}: {len(prompts)} prompts, {sum(map(len, prompts))} input / {sum(outs)} output tokens, "
              f"inputs {min(map(len, prompts))}-{max(map(len, prompts))}, outputs {min(outs)}-{max(outs)}")
