"""The optimized HLO of a profiled forward (`profile_step.py --hlo`): op counts of its entry
computation, and what each of the profile's costliest fusion kernels computes (its output
shape and the ops it fuses), to tell e.g. an activation quantization from a norm."""
from __future__ import annotations

import collections
import re
from pathlib import Path


def hlo_report(text: str, out: Path, name: str = "forward") -> None:
    """Op counts of the optimized module's entry computation. (In jax 0.11.2 this text never
    names XLA's command buffers, which are formed later: the profile's kernel names tag each
    kernel with its `command_buffer_N`.)"""
    (out / f"{name}_after_optimizations.txt").write_text(text)
    entry = text[text.index("\nENTRY"):]
    entry = entry[: entry.index("\n}\n")]
    ops = collections.Counter()
    targets = collections.Counter()
    for line in entry.splitlines()[1:]:
        m = re.search(r"=\s*\S+(?:\[[^\]]*\])?(?:\{[^}]*\})?\s+([\w-]+)\(", line)
        if not m:
            m = re.search(r"\)\s+([\w-]+)\(", line)
        op = m.group(1) if m else "?"
        ops[op] += 1
        t = re.search(r'custom_call_target="([^"]+)"', line)
        if t:
            targets[t.group(1)] += 1
        c = re.search(r"to_apply=%?([\w.-]+)", line) or re.search(r"calls=%?([\w.-]+)", line)
        if c and "command_buffer" in c.group(1):
            ops["(command buffer)"] += 1
    print(f"\n== optimized {name} HLO: {len(entry.splitlines()) - 1} entry instructions; "
          f"{text.count('command_buffer')} mentions of command_buffer")
    print("  entry ops: " + ", ".join(f"{k} {v}" for k, v in ops.most_common(15)))
    print("  entry custom calls: " + ", ".join(f"{k} {v}" for k, v in targets.most_common(10)))


def describe_fusions(text: str, kernels: list[str]) -> None:
    """One line per kernel named like an HLO fusion (`fusion_625`, `loop_convert_fusion_31`):
    its output shape and fusion kind, and the ops of its fused computation by count."""
    for kernel in kernels:
        m = re.search(rf"^\s*(?:ROOT )?%?{re.escape(kernel)} = (.*?) fusion\(.*?kind=(\w+).*?calls=%?([\w.-]+)",
                      text, re.M)
        if not m:
            continue
        shape, fusion_kind, called = m.groups()
        body = re.search(rf"^%?{re.escape(called)} .*?\{{\n(.*?)\n\}}", text, re.M | re.S)
        ops = collections.Counter(re.findall(r"=\s*\S+\s+([a-z][\w-]*)\(", body.group(1))) if body else {}
        ops.pop("parameter", None)
        print(f"    {kernel[:32]:<32} {shape[:60]:<60} {fusion_kind}: "
              + ", ".join(f"{op} {n}" for op, n in ops.most_common(8)))
