"""Benchmark scripts end to end on CPU: `benchmark_serving.py` against a live `jaxpaged.serve` on a tiny
model, the throughput and latency scripts' JSON, then `notebooks/benchmarks.ipynb` on those results
(and on an empty folder)."""
from __future__ import annotations

import base64
import json
import math
import os
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).parent.parent
SCRIPTS = ROOT / "scripts"
NOTEBOOK = ROOT / "notebooks" / "benchmarks.ipynb"
ENGINE = ["--max-model-len", "128", "--max-num-seqs", "8", "--max-num-batched-tokens", "64", "--num-kv-blocks", "256"]
sys.path.insert(0, str(SCRIPTS))

import benchmark_serving as bs  # noqa: E402
from _server import free_port, wait_healthy  # noqa: E402


def _env(tmp_path: Path) -> dict:
    return {**os.environ, "JAXPAGED_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def _run_notebook(results: Path, monkeypatch, tmp_path: Path) -> nbformat.NotebookNode:
    monkeypatch.setenv("JAXPAGED_RESULTS", str(results))  # the kernel inherits this process's environment
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors, [(e.ename, e.evalue) for e in errors]
    return nb


def _text(nb) -> str:
    return "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []) if o.output_type == "stream")


def _images(nb) -> list[bytes]:
    return [base64.b64decode(o["data"]["image/png"]) for c in nb.cells for o in c.get("outputs", [])
            if "image/png" in o.get("data", {})]


def test_workload_and_arrivals():
    args = Namespace(seed=3, num_prompts=20, workload="mixed", input_len=8, output_len=4, min_len=4, max_len=40)
    from workloads import workload  # the serving script draws exactly the throughput script's prompts

    assert bs.workload(args, 512) == workload(args, 512)
    prompts, outs = bs.workload(args, 512)
    again = bs.fresh_prompts(prompts, 512, 3, 1)  # later rates: same lengths, other ids
    assert [len(p) for p in again] == [len(p) for p in prompts] and again != prompts
    assert bs.fresh_prompts(prompts, 512, 3, 0) is prompts and max(max(p) for p in again) < 512

    assert bs.arrival_offsets(5, math.inf, 1.0, 0, 0) == [0.0] * 5
    offs = bs.arrival_offsets(4000, 10.0, 1.0, 0, 0)
    assert offs[0] == 0 and offs == sorted(offs) and offs == bs.arrival_offsets(4000, 10.0, 1.0, 0, 0)
    gaps = [b - a for a, b in zip(offs, offs[1:])]
    assert abs(sum(gaps) / len(gaps) - 0.1) < 0.01  # Poisson at 10/s: mean gap 0.1 s, std 0.1 s
    assert abs(math.sqrt(sum((g - 0.1) ** 2 for g in gaps) / len(gaps)) - 0.1) < 0.01
    assert bs.parse_rates("1,4,inf") == [1.0, 4.0, math.inf] and bs.rate_label(math.inf) == "inf"

    for url in ("http://127.0.0.1:8000", "http://localhost:1", "http://[::1]:8000"):
        bs.check_loopback(url)
    with pytest.raises(SystemExit):
        bs.check_loopback("http://10.1.2.3:8000")


def test_shape_model_tokenizer_streams_every_token(tmp_path):
    """scripts/make_shape_model.py: the synthetic tokenizer covers the vocab, every non-special id decodes
    to its own word and the engine's incremental detokenizer gives one text delta per generated token."""
    import random

    import transformers
    from make_shape_model import SHAPES, config_of, make_shape_model

    from jaxpaged.engine.detokenizer import IncrementalDetokenizer

    assert config_of("llama3-8b").items() >= SHAPES["llama3-8b"].items()
    out = make_shape_model(tmp_path / "tiny", "tiny")
    cfg = json.loads((out / "config.json").read_text())
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert len(tok) == cfg["vocab_size"] == 128256 and cfg["num_hidden_layers"] == 2
    assert (tok.bos_token_id, tok.eos_token_id) == (cfg["bos_token_id"], cfg["eos_token_id"]) == (128000, 128001)
    assert set(tok.all_special_ids) == {128000, 128001}  # as Llama 3's: skipped by skip_special_tokens
    assert tok.decode([128000, 128001]) and not tok.decode([128000, 128001], skip_special_tokens=True)
    rng = random.Random(0)
    ids = [0, 1, 127999, 128002, 128255] + [i for i in rng.sample(range(128256), 500) if i < 128000 or i > 128001]
    assert [tok.decode([i], skip_special_tokens=True) for i in ids] == [f"t{i}" for i in ids]
    assert tok.encode(" ".join(f"t{i}" for i in ids[:5]), add_special_tokens=False) == ids[:5]
    for prompt in ([3, 4, 5], [128000], [128001, 9]):
        detok = IncrementalDetokenizer(tok, prompt)
        deltas = [detok.add([i]) for i in ids]
        assert all(deltas) and "".join(deltas).strip() == tok.decode(ids), prompt


def test_serving_benchmark_then_notebook(tiny_model_dir, tmp_path, monkeypatch):
    model = str(tiny_model_dir("llama"))
    results = tmp_path / "results"
    results.mkdir()
    env, port = _env(tmp_path), free_port()
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "jaxpaged.serve", "--model", model, "--host", "127.0.0.1",
                               "--port", str(port), "--no-enable-prefix-caching", *ENGINE],
                              env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        # the offline scripts' JSON for the notebook, while the server starts
        cache = ["--compilation-cache", str(tmp_path / "xla")]
        subprocess.run([sys.executable, SCRIPTS / "benchmark_throughput.py", "--model", model, *ENGINE, *cache,
                        "--num-prompts", "4", "--input-len", "8", "--output-len", "4", "--no-progress",
                        "--token-buckets", "24", "--num-scheduler-steps", "2", "--compare", "hf",
                        "--json", results / "throughput-fixed.json"],
                       env=env, check=True, capture_output=True, timeout=300)
        lat = subprocess.run([sys.executable, SCRIPTS / "benchmark_latency.py", "--model", model, *ENGINE, *cache,
                              "--prompt-lens", "16,128", "--batches", "1,2", "--decode-steps", "3",
                              "--decode-prompt-len", "8", "--json", results / "latency.json",
                              "--speculative-config", '{"method": "ngram", "num_speculative_tokens": 2, '
                              '"synthetic_acceptance_rate": 1.0}'],
                             env=env, check=True, capture_output=True, text=True, timeout=300)
        assert "skipping TTFT of a 128-token prompt" in lat.stdout  # a prompt of max_model_len tokens
        summary = json.loads((results / "throughput-fixed.json").read_text())
        hf, run = summary["hf"], summary["jaxpaged"]  # HF ran in its own process, on the same prompts
        assert hf["wall_s"] > 0 and hf["speedup"] == pytest.approx(hf["wall_s"] / run["wall_s"])
        replayed = sum(b["steps"] for b in run["device_by_bucket"].values())  # every launched step, once
        assert 0 < replayed <= run["steps"] and run["device_s"] > 0 and 0 < run["device_busy"] <= 1
        assert run["engine"]["buckets"] == [24, 64]  # --token-buckets, plus the budget
        assert "24 x2" in run["device_by_bucket"]  # multi-step decode steps, replayed too
        spec = json.loads((results / "latency.json").read_text())["spec_decode"]  # synthetic: all accepted
        assert spec["num_draft_tokens"] > 0 and spec["acceptance_rate"] == 1.0
        lat = json.loads((results / "latency.json").read_text())["seconds"]
        assert "TTFT, prompt 128" not in lat and lat["  its device time, prompt 16"] > 0 and lat["TTFT, prompt 16"] > 0
        assert 0 < lat["  its forwards, batch 2"] < lat["  its device time, batch 2"]  # the verify heads' share

        wait_healthy(port, [server], (tmp_path / "server.log").read_text)

        n, rates = 6, ["8", "inf"]
        cmd = [sys.executable, SCRIPTS / "benchmark_serving.py", "--base-url", f"http://127.0.0.1:{port}",
               "--num-prompts", str(n), "--request-rates", ",".join(rates), "--workload", "mixed",
               "--min-len", "4", "--max-len", "24", "--seed", "1", "--max-duration", "120", "--request-timeout", "60",
               "--json", results / "serving.json", "--plot", tmp_path / "serving.png", "--no-progress"]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
        assert out.returncode == 0, out.stdout + out.stderr
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()

    # the table comes last: one block of TTFT/TPOT/ITL/E2E rows and the server's means per rate
    tail = out.stdout.strip().splitlines()
    assert [line.split()[0] for line in tail[-10::5]] == rates and tail[-2].split()[-6] == "E2E"
    assert tail[-1].split()[:3] == ["server", "means:", "TTFT"]

    summary = json.loads((results / "serving.json").read_text())
    _, outs = bs.workload(Namespace(seed=1, num_prompts=n, workload="mixed", input_len=0, output_len=0,
                                    min_len=4, max_len=24), 512)
    assert summary["kind"] == "serving" and summary["model"] == model and summary["server"]["vocab_size"] == 512
    assert summary["output_tokens"] == sum(outs) and [r["request_rate"] for r in summary["results"]] == [8.0, "inf"]
    for row in summary["results"]:
        assert (row["completed"], row["failed"], row["errors"]) == (n, 0, {}), row
        assert row["total_output_tokens"] == row["expected_output_tokens"] == sum(outs)
        assert row["duration_s"] > 0 and row["request_throughput"] == pytest.approx(n / row["duration_s"])
        assert row["output_throughput"] > 0 and row["total_token_throughput"] > row["output_throughput"]
        for key in ("ttft", "tpot", "itl", "e2el"):
            s = row[f"{key}_ms"]
            assert 0 < s["median"] <= s["p90"] <= s["p99"], (key, s)
            assert s["mean"] > 0
        assert row["ttft_ms"]["median"] < row["e2el_ms"]["median"]
        server = row["server_mean_ms"]  # the server's own view: within the client's, queue + prefill = TTFT
        assert 0 < server["ttft"] <= row["ttft_ms"]["mean"] and 0 < server["itl"]
        assert server["queue"] + server["prefill"] == pytest.approx(server["ttft"], rel=0.05)
        assert 0 < row["client_cpu_busy"] < 1.5
    assert summary["results"][1]["duration_s"] < summary["results"][0]["duration_s"]  # inf: all at once
    try:
        import matplotlib  # noqa: F401 - the script plots only when it can
    except ImportError:
        assert "matplotlib is not installed" in out.stderr
    else:
        assert (tmp_path / "serving.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    nb = _run_notebook(results, monkeypatch, tmp_path)
    assert "1 throughput, 1 latency, 1 serving" in _text(nb)
    assert len(_images(nb)) == 4  # tok/s vs HF, roofline fraction, latency vs floor, serving vs rate


def test_notebook_with_no_results(tmp_path, monkeypatch):
    nb = _run_notebook(tmp_path / "missing", monkeypatch, tmp_path)
    assert "No results folder" in _text(nb) and not _images(nb)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.json").write_text('{"not": "a result"}')
    nb = _run_notebook(tmp_path / "empty", monkeypatch, tmp_path)
    assert "No benchmark results" in _text(nb) and "notes.json" in _text(nb) and not _images(nb)


def test_run_summary_compares_the_suites_ab_runs(tmp_path):
    """`run_summary.py --ab`: per measure the base and this tree's values over rounds, their
    medians' change signed so that positive is better (higher tok/s, lower ms and seconds)."""
    from run_summary import ab_rows

    def throughput(tok_s, startup, device=None):
        return {"jaxpaged": {"output_tok_per_s": tok_s, "startup_s": startup, "device_s": device}}

    def latency(itl_s):
        return {"floor_s": 0.004, "seconds": {"decode ITL, batch 1": itl_s}}

    runs = {"mixed-base-1": throughput(100.0, 50.0), "mixed-this-1": throughput(98.0, 55.0),
            "mixed-base-2": throughput(104.0, 12.0), "mixed-this-2": throughput(102.0, 11.0),
            "fixed-base-1": throughput(200.0, 10.0, 6.0), "fixed-this-1": throughput(210.0, 10.0, 5.7),
            "latency-base-1": latency(0.0050), "latency-this-1": latency(0.0049)}
    for name, d in runs.items():
        (tmp_path / f"ab-{name}.json").write_text(json.dumps(d))
    rows = {r[0]: r for r in ab_rows([tmp_path])}
    assert rows["mixed tok/s"][3] == "-2.0% (worse)"  # medians 102 vs 100
    assert rows["cold start s (round 1)"][1:] == ["50.00", "55.00", "-10.0% (worse)"]  # round 1 only
    assert rows["fixed tok/s"][3] == "+5.0% (better)" and rows["fixed device s"][3] == "+5.0% (better)"
    assert rows["batch-1 ITL ms"][3] == "+2.0% (better)" and "TTFT 512 ms" not in rows


def test_device_timeline_gaps_from_a_perfetto_capture(tmp_path, capsys):
    """`device_timeline.py` on a hand-made capture: kernels on two streams of one device,
    overlapping or nested (one busy interval) and apart (gaps of 30 and 50 us); host events
    do not count."""
    import gzip

    import device_timeline

    meta = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
            {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/host:CPU"}},
            {"ph": "M", "name": "thread_name", "pid": 2, "tid": 7, "args": {"name": "python"}}]
    kernels = [(1, 10, 0, 100, "fwd_a"), (1, 11, 50, 100, "copy"), (1, 10, 110, 10, "inside"),
               (1, 10, 180, 20, "head"), (1, 11, 250, 10, "fwd_b")]  # busy 0-150, 180-200, 250-260
    events = meta + [{"ph": "X", "pid": pid, "tid": tid, "ts": ts, "dur": dur, "name": name}
                     for pid, tid, ts, dur, name in kernels]
    events.append({"ph": "X", "pid": 2, "tid": 7, "ts": 150, "dur": 90, "name": "PjitFunction(_head)"})
    folder = tmp_path / "plugins" / "profile" / "run"
    folder.mkdir(parents=True)
    with gzip.open(folder / "perfetto_trace.json.gz", "wt") as f:
        json.dump({"traceEvents": events}, f)
    loaded, procs, threads = device_timeline.load_events(str(tmp_path))
    busy, window, gaps = device_timeline.device_gaps(loaded, procs)
    assert (busy, window) == (180, 260)
    assert gaps == [(150, 30, "copy", "head"), (200, 50, "head", "fwd_b")]
    assert dict(device_timeline.host_dispatches(loaded, procs, threads)) == {("python", "PjitFunction(_head)"): [90]}
    device_timeline.main([str(tmp_path)])
    assert "device busy 0.18 of 0.26 ms (69.2%); 2 gaps, 0.08 ms idle" in capsys.readouterr().out
