"""One line per `benchmark_throughput.py --json` result: throughput, wall, replayed device
time, busy fraction, dispatch per step, start-up (the device scripts' printed summary).

    python scripts/run_summary.py RESULT.json [...]
"""
from __future__ import annotations

import json
import sys

for path in sys.argv[1:]:
    j = json.load(open(path))["jaxpaged"]
    print(f"  {j['output_tok_per_s']:.0f} tok/s, wall {j['wall_s']:.2f} s, device {j.get('device_s') or 0:.2f} s, "
          f"busy {j.get('device_busy') or 0:.3f}, {j['steps']} steps, dispatch {j['host_ms_per_step']['dispatch']:.2f} "
          f"(+ loop {j['host_ms_per_step'].get('dispatch_loop', 0):.2f}) ms/step, startup {j['startup_s']:.0f} s")
