"""One-off: where the paged Mosaic prefill kernel's time goes (device time per kernel)."""
import sys, time
sys.path.insert(0, "scripts")
import jax, jax.numpy as jnp
from bench_kernels import make_batch, attn_flops
from bench_gemm import device_time
from jaxpaged.kernels.paged_prefill_mgpu import paged_prefill_mgpu
sys.path.insert(0, 'exp')
from pp_old import paged_prefill_mgpu as pp_old
from jaxpaged.kernels.paged_attention_gpu import paged_attention_gpu

hq, hkv, d = 32, 8, 128
scale = d ** -0.5
rows = []
def run(case, plan, bs, fn_name, **kw):
    k, v, sets = make_batch(jax.random.key(1), plan, hq=hq, hkv=hkv, d=d, bs=bs, sets=1)
    q, qs, lens, bt = sets[0]
    if fn_name == "pallas":
        f = jax.jit(lambda q, k, v, qs, lens, bt: paged_attention_gpu(q, k, v, jnp.int32(1), qs, lens, bt, scale=scale))
    else:
        fn = pp_old if fn_name == "old" else paged_prefill_mgpu
        f = jax.jit(lambda q, k, v, qs, lens, bt: fn(q, k, v, jnp.int32(1), qs, lens, bt, scale=scale, **kw))
    try:
        f(q, k, v, qs, lens, bt).block_until_ready()
        dt = device_time(lambda: f(q, k, v, qs, lens, bt).block_until_ready(), 10, 1, "/tmp/prof")
    except Exception as e:
        print(case, bs, fn_name, kw, "ERROR", str(e)[:300], flush=True); return
    us, top = dt
    tf = attn_flops(plan, hq, d) / (us * 1e-6) / 1e12
    rows.append(f"| {case} | bs{bs} {fn_name} {kw} | {us:.1f} us | {tf:.0f} TF/s | {top} |")
    print(rows[-1], flush=True)

for bs in (16, 64, 128):
    run("8x2048", [(0, 2048)] * 8, bs, "old")
    run("8x2048", [(0, 2048)] * 8, bs, "mosaic")
run("1x16384", [(0, 16384)], 16, "old")
run("8x2048", [(0, 2048)] * 8, 16, "pallas")
run("8x2048", [(0, 2048)] * 8, 16, "mosaic", stages=3)
run("8x2048", [(0, 2048)] * 8, 64, "mosaic", stages=3)
run("1x16384", [(0, 16384)], 16, "mosaic")
run("1x16384", [(0, 16384)], 64, "mosaic")
run("1x16384", [(0, 16384)], 16, "pallas")
print("\n".join(rows))
