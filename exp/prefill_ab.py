"""One-off: the paged Mosaic prefill kernel, this tree against .ab/s31 (b780983), device time."""
import importlib.util
import sys

sys.path.insert(0, "scripts")
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from bench_gemm import device_time  # noqa: E402
from bench_kernels import attn_flops, make_batch  # noqa: E402

from jaxpaged.kernels.paged_attention_gpu import paged_attention_gpu  # noqa: E402
from jaxpaged.kernels.paged_prefill_mgpu import paged_prefill_mgpu  # noqa: E402

spec = importlib.util.spec_from_file_location("pp_old", ".ab/s31/jaxpaged/kernels/paged_prefill_mgpu.py")
old = importlib.util.module_from_spec(spec)
spec.loader.exec_module(old)
hq, hkv, d = 32, 8, 128
scale = d ** -0.5
rows = []


def run(case, plan, bs, name, **kw):
    k, v, sets = make_batch(jax.random.key(1), plan, hq=hq, hkv=hkv, d=d, bs=bs, sets=1)
    q, qs, lens, bt = sets[0]
    if name == "pallas":
        f = jax.jit(lambda q, k, v, qs, lens, bt: paged_attention_gpu(q, k, v, jnp.int32(1), qs, lens, bt,
                                                                       scale=scale))
    else:
        fn = old.paged_prefill_mgpu if name == "old" else paged_prefill_mgpu
        f = jax.jit(lambda q, k, v, qs, lens, bt: fn(q, k, v, jnp.int32(1), qs, lens, bt, scale=scale, **kw))
    try:
        out = f(q, k, v, qs, lens, bt)
        ref = paged_attention_gpu(q, k, v, jnp.int32(1), qs, lens, bt, scale=scale)
        err = float(jnp.linalg.norm((out - ref).astype(jnp.float32)) / jnp.linalg.norm(ref.astype(jnp.float32)))
        us, top = device_time(lambda: f(q, k, v, qs, lens, bt).block_until_ready(), 10, 1, "/tmp/prof")
    except Exception as e:  # noqa: BLE001
        print(case, bs, name, kw, "ERROR", str(e)[:400], flush=True)
        return
    tf = attn_flops(plan, hq, d) / (us * 1e-6) / 1e12
    rows.append(f"| {case} | bs{bs} {name} {kw} | {us:.1f} us | {tf:.0f} TF/s | err {err:.1e} | {top} |")
    print(rows[-1], flush=True)


for bs in (16, 64):
    for name in ("old", "new", "old", "new"):
        run("8x2048", [(0, 2048)] * 8, bs, name)
run("8x2048", [(0, 2048)] * 8, 16, "pallas")
for name in ("old", "new"):
    run("chunk 8192 at 24k", [(24576, 8192)], 16, name)
    run("1x16384", [(0, 16384)], 16, name)
print("\n".join(rows))
