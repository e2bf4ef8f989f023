"""GPU check of the engine on a tiny model: KV pool sized from `gpu_memory_utilization`, the
Pallas kernel against the jnp reference end to end, on Hopper the Mosaic prefill route against
the Pallas kernel, fp8 and int4 batch-1 decode (their 1-token forms) against the same requests
in 16-token steps, and tensor parallelism (when the machine has several GPUs) against one
GPU. Prints one line per check and exits non-zero on a mismatch.

    PYTHONPATH=. python scripts/check_gpu_engine.py
"""
from __future__ import annotations

import argparse
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from jaxpaged import LLM, SamplingParams
from jaxpaged.models.tiny import make_tiny_model


def main() -> int:
    model = make_tiny_model(tempfile.mkdtemp(), "llama-tp")
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 500, int(rng.integers(5, 60))).tolist() for _ in range(24)]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    failed = 0

    def run(**kw):
        return greedy(model, prompts, params, dtype="float32", **kw)

    llm, ref = run(attention_backend="reference", gpu_memory_utilization=0.5)
    stats = jax.devices()[0].memory_stats() or {}
    print(f"memory sizing: {llm.engine.startup['num_kv_blocks']} blocks "
          f"({llm.engine.startup['kv_capacity_tokens']} tokens) at gpu_memory_utilization=0.5 of "
          f"{stats.get('bytes_limit', 0) / 2**30:.1f} GiB; {stats.get('bytes_in_use', 0) / 2**30:.1f} GiB "
          "in use after allocation")
    del llm
    _, kernel = run(attention_backend="pallas", num_kv_blocks=2048)
    # The kernel and the reference round float32 dots differently (TF32 on the GPU), so a
    # near-tie may flip a greedy token: report it; TP must match the 1-GPU kernel run exactly
    # up to its all-reduce order, so report that too.
    print(f"pallas kernel, 1 GPU: {sum(g == r for g, r in zip(kernel, ref))}/{len(ref)} greedy outputs "
          "equal to the jnp reference backend")
    if getattr(jax.devices()[0], "compute_capability", "") == "9.0":
        failed += check_mosaic(prompts, params)
    failed += check_one_token_steps(prompts, params)
    failed += check_one_token_kernels()
    for tp in (2, 4, 8):
        if tp <= len(jax.devices()):
            _, got = run(tensor_parallel_size=tp, num_kv_blocks=2048)
            same = sum(g == k for g, k in zip(got, kernel))
            failed += same != len(kernel)
            print(f"tensor_parallel_size={tp}: {same}/{len(kernel)} greedy outputs equal to the 1-GPU kernel run")
    print("OK" if not failed else "MISMATCH")
    return int(failed > 0)


def greedy(model: str, prompts: list[list[int]], params: SamplingParams, **kw) -> tuple[LLM, list[list[int]]]:
    """An engine on `model` (256-token context, 32 sequences, 128-token steps, `kw` besides)
    and its greedy token ids for `prompts`."""
    llm = LLM(model, **{"max_model_len": 256, "max_num_seqs": 32, "max_num_batched_tokens": 128, **kw})
    return llm, [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def check_mosaic(prompts: list[list[int]], params: SamplingParams) -> bool:
    """Hopper: the Mosaic prefill route against the Pallas kernel in bf16 (head dim 64, prompts
    of 5-60 tokens prefilled in 128-token steps, so both routes' sides run). The two kernels sum
    in different orders, so a near-tie may flip a greedy token; more than 2 in 24 is a bug."""
    model = make_tiny_model(tempfile.mkdtemp(), "llama", config=dict(head_dim=64))
    outs = {}
    for backend in ("pallas", "mosaic"):
        _, outs[backend] = greedy(model, prompts, params, dtype="bfloat16", num_kv_blocks=2048,
                                  attention_backend=backend)
    same = sum(m == p for m, p in zip(outs["mosaic"], outs["pallas"]))
    print(f"mosaic prefill route, bf16: {same}/{len(prompts)} greedy outputs equal to the pallas kernel run")
    return same < len(prompts) - 2


def check_one_token_steps(prompts: list[list[int]], params: SamplingParams) -> bool:
    """fp8 W8A8 and int4 decoding one request at a time in 1-token steps (the reduce form; the
    int4 kernel's FMA form) against the same run in 16-token steps (the fp8 GEMM; the MMA form),
    beside bf16 (a 1-row against a 16-row GEMM) and fp8 with the GEMM in its 1-token steps too.
    A random tiny model amplifies rounding (fp8 activations most: one flipped e4m3 rounding
    moves a value ~6%), so the greedy counts and the first 1-token step's logprob gaps are
    printed, not judged: `check_one_token_kernels` holds the forms to exact sums. A quantized
    model on a GPU must get the 1-token bucket. Hidden size 256: int4 groups of 128."""
    from jaxpaged.models.quantization import kernels

    model = make_tiny_model(tempfile.mkdtemp(), "llama", config=dict(hidden_size=256, intermediate_size=512))
    top = SamplingParams(temperature=0, max_tokens=params.max_tokens, ignore_eos=True, logprobs=5)
    one_token = (1, 16, 32, 64, 128)

    def run(quant, buckets):
        llm = LLM(model, max_model_len=256, max_num_seqs=1, max_num_batched_tokens=128, dtype="bfloat16",
                  quantization=quant, num_kv_blocks=2048, token_buckets=buckets)
        return [o.outputs[0] for o in llm.generate(prompts[:12], top, use_tqdm=False)], llm.engine.runner.buckets

    failed = False
    for label, quant, buckets in (("bf16", None, one_token), ("fp8", "fp8", None),
                                  ("fp8, GEMM at 1 token", "fp8", one_token), ("int4", "int4", None)):
        reduce_max, kernels.FP8_REDUCE_MAX_TOKENS = kernels.FP8_REDUCE_MAX_TOKENS, 0 if "GEMM" in label else 1
        try:
            (one, one_buckets), (wide, _) = run(quant, buckets), run(quant, (16, 32, 64, 128))
        finally:
            kernels.FP8_REDUCE_MAX_TOKENS = reduce_max
        same = sum(a.token_ids == b.token_ids for a, b in zip(one, wide))
        diff = max(abs(a.logprobs[1][t].logprob - b.logprobs[1][t].logprob)
                   for a, b in zip(one, wide) for t in a.logprobs[1].keys() & b.logprobs[1].keys())
        print(f"{label} batch-1 decode (buckets {one_buckets}) against 16-token steps: {same}/{len(one)} "
              f"greedy outputs equal; the first 1-token step's top-5 logprobs differ by {diff:.4f} at most")
        failed |= buckets is None and one_buckets[0] != 1 and jax.default_backend() == "gpu"
    return failed


def check_one_token_kernels() -> bool:
    """The 1-token forms on Llama-3-8B's widest inputs against float64 sums of the same
    quantized values, in float32: fp8's reduce form (the fp8 GEMM printed beside it: cuBLASLt's
    accumulator) and the int4 kernel's FMA form, each within 1e-5 of the largest output."""
    from jaxpaged.engine.compile_cache import log_late_compiles
    from jaxpaged.kernels.int4_matmul_gpu import int4_matmul_gpu
    from jaxpaged.models.quantization.kernels import fp8_matmul, quantize_activations_fp8
    from jaxpaged.models.quantization.packing import unpack_int4
    from jaxpaged.models.quantization.quantize import quantize

    log_late_compiles(None)  # these compiles are no engine's
    f64 = lambda a: np.asarray(a, np.float64)  # noqa: E731
    rng = np.random.default_rng(1)
    failed = False
    for k in (4096, 14336):
        w = jnp.asarray((rng.standard_normal((k, 1024)) / np.sqrt(k)).astype(np.float32))
        x = jnp.asarray(rng.standard_normal((1, k)).astype(np.float32))
        fp8, int4 = quantize(w, "fp8"), quantize(w, "int4", group_size=128)
        xq, x_scale = quantize_activations_fp8(x, None)
        fp8_want = f64(xq.astype(jnp.float32)) @ f64(fp8.qweight.astype(jnp.float32)).T * f64(x_scale) * f64(fp8.scale)
        per_row = lambda a: np.repeat(f64(a), int4.group_size, axis=0)  # noqa: E731
        int4_want = f64(x) @ ((f64(unpack_int4(int4.qweight)) - per_row(int4.zeros)) * per_row(int4.scales))
        errs = {name: np.abs(f64(got) - want).max() / np.abs(want).max() for name, got, want in (
            ("fp8 reduce", fp8_matmul(x, fp8, reduce=True), fp8_want),
            ("fp8 GEMM", fp8_matmul(x, fp8, reduce=False), fp8_want),
            ("int4 FMA form", int4_matmul_gpu(x, int4.qweight, int4.scales, int4.zeros), int4_want))}
        print(f"1-token forms at K={k} against float64 sums, max error / max output: "
              + ", ".join(f"{n} {e:.1e}" for n, e in errs.items()))
        failed |= errs["fp8 reduce"] > 1e-5 or errs["int4 FMA form"] > 1e-5
    return failed

if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    sys.exit(main())
