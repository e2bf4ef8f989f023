#!/bin/bash
# Session 10: GPU clocks and power while the engine runs the fixed workload, and while the
# decode attention kernel runs alone (kernel bench, batch 256, context 512, engine-sized pool):
# does the engine's attention (162 us per layer) run slower than the bench's (145 us) because
# the GEMMs around it hold the GPU at its power limit? nvidia-smi samples every 100 ms.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export OUT=${OUT:-/tmp/jaxpaged-clocks}; mkdir -p $OUT
q=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,clocks_event_reasons.active
nvidia-smi --query-gpu=$q --format=csv,noheader -i 0 >/dev/null 2>&1 || q=${q%,clocks_event_reasons.active}
sample() { nvidia-smi --query-gpu=$q --format=csv,noheader,nounits -lms 100 -i 0 > $OUT/smi-$1.csv & echo $!; }
cd scripts; source bench_run.sh
p=$(sample fixed); bench fixed 0 --num-kv-blocks 24000 --workload fixed; kill $p
p=$(sample kernel); CUDA_VISIBLE_DEVICES=0 timeout 150 python bench_kernels.py --only decode --decode-batch 256 \
  --decode-ctx 512 --decode-layers 32 --decode-table 2048 --log $OUT/kernel.log > /dev/null 2>&1; kill $p
grep "decode b256" $OUT/kernel.log | head -3
python - <<'PY'
import csv, os, statistics as st
out = os.environ["OUT"]
for name in ("fixed", "kernel"):
    rows = [r for r in csv.reader(open(f"{out}/smi-{name}.csv")) if len(r) >= 5]
    busy = [r for r in rows if float(r[3]) > 250]  # samples under load (W)
    if not busy:
        print(name, "no samples above 250 W"); continue
    sm, mem, w = ([float(r[i]) for r in busy] for i in (1, 2, 3))
    reasons = sorted({r[5].strip() for r in busy}) if len(busy[0]) > 5 else "-"
    print(f"{name}: {len(busy)} of {len(rows)} samples above 250 W; SM MHz median {st.median(sm):.0f} "
          f"(min {min(sm):.0f}, max {max(sm):.0f}); mem MHz {st.median(mem):.0f}; power W median {st.median(w):.0f} "
          f"(max {max(w):.0f}); reasons {reasons}")
PY
