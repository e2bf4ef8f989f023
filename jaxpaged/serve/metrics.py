"""Prometheus metrics for `/metrics` under vLLM's names (`vllm:*`, labelled `model_name`), so
dashboards and autoscalers written for vLLM read them.

Engine gauges and counters are read from the latest `SchedulerStats` the engine core sent
(with each step) at scrape time; latency histograms are observed from each request's outputs
as they are produced.
"""
from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from jaxpaged.engine.outputs import RequestOutput
from jaxpaged.engine.messages import SchedulerStats

_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_ITL_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
                2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)


class Metrics:
    """One registry per app; `observe` and `forget` are called by the engine client."""

    def __init__(self, model_name: str, stats: Callable[[], SchedulerStats]):
        self.registry = CollectorRegistry()
        self.labels = {"model_name": model_name}
        self._stats = stats
        self.registry.register(self)
        hist = lambda name, doc, buckets: Histogram(  # noqa: E731
            f"vllm:{name}", doc, ["model_name"], buckets=buckets, registry=self.registry
        ).labels(model_name)
        self.ttft = hist("time_to_first_token_seconds", "Time to first token.", _TTFT_BUCKETS)
        self.itl = hist("inter_token_latency_seconds", "Time between engine outputs of a request.",
                        _ITL_BUCKETS)
        self.e2e = hist("e2e_request_latency_seconds", "Arrival to last token.", _E2E_BUCKETS)
        self.queue = hist("request_queue_time_seconds", "Arrival to first scheduled.", _E2E_BUCKETS)
        self.prefill = hist("request_prefill_time_seconds", "First scheduled to first token.", _E2E_BUCKETS)
        self.decode = hist("request_decode_time_seconds", "First token to last token.", _E2E_BUCKETS)
        self.success = Counter("vllm:request_success", "Finished requests by finish reason.",
                               ["model_name", "finished_reason"], registry=self.registry)
        self._last_token_time: dict[str, float] = {}

    def observe(self, out: RequestOutput) -> None:
        m, rid = out.metrics, out.request_id
        if m is None or m.last_token_time is None:
            if out.finished:  # a prompt-only request (max_tokens 0)
                self.success.labels(finished_reason=out.outputs[0].finish_reason, **self.labels).inc()
            return
        previous = self._last_token_time.get(rid)
        if previous is None and m.first_token_time is not None:
            self.ttft.observe(m.first_token_time - m.arrival_time)
        elif previous is not None and m.last_token_time > previous:
            self.itl.observe(m.last_token_time - previous)
        self._last_token_time[rid] = m.last_token_time
        if out.finished:
            self._last_token_time.pop(rid, None)
            self.e2e.observe(m.last_token_time - m.arrival_time)
            if m.first_scheduled_time is not None and m.first_token_time is not None:
                self.queue.observe(m.first_scheduled_time - m.arrival_time)
                self.prefill.observe(m.first_token_time - m.first_scheduled_time)
                self.decode.observe(m.last_token_time - m.first_token_time)
            reason = out.outputs[0].finish_reason if out.outputs else "stop"
            self.success.labels(finished_reason=reason, **self.labels).inc()

    def forget(self, request_id: str) -> None:
        """An aborted request: it will produce no more outputs."""
        self._last_token_time.pop(request_id, None)
        self.success.labels(finished_reason="abort", **self.labels).inc()

    def collect(self):
        """The engine's gauges and counters from its latest snapshot (prometheus collector)."""
        s: SchedulerStats = self._stats()
        names = list(self.labels)
        values = list(self.labels.values())
        gauge, counter = GaugeMetricFamily, CounterMetricFamily
        for family, name, doc, value in (
            (gauge, "num_requests_running", "Requests in the running batch.", s.num_running),
            (gauge, "num_requests_waiting", "Requests waiting to be scheduled.", s.num_waiting),
            (gauge, "kv_cache_usage_perc", "Fraction of KV blocks in use (0-1).", s.kv_usage),
            (counter, "prompt_tokens", "Prompt tokens computed (prefix-cache hits excluded).", s.prompt_tokens),
            (counter, "generation_tokens", "Generated tokens.", s.generation_tokens),
            (counter, "num_preemptions", "Preemptions (recompute).", s.preemptions),
            (counter, "prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", s.prefix_cache_queries),
            (counter, "prefix_cache_hits", "Prompt tokens found in the prefix cache.", s.prefix_cache_hits),
            (counter, "spec_decode_num_drafts", "Speculative rows verified (with draft tokens).",
             s.spec_decode_num_drafts),
            (counter, "spec_decode_num_draft_tokens", "Draft tokens verified.", s.spec_decode_num_draft_tokens),
            (counter, "spec_decode_num_accepted_tokens", "Draft tokens accepted.", s.spec_decode_num_accepted_tokens),
        ):
            metric = family(f"vllm:{name}", doc, labels=names)
            metric.add_metric(values, value)
            yield metric
        per_pos = CounterMetricFamily("vllm:spec_decode_num_accepted_tokens_per_pos",
                                      "Draft tokens accepted, by position in the draft.", labels=[*names, "position"])
        for position, value in enumerate(s.spec_decode_num_accepted_tokens_per_pos):
            per_pos.add_metric([*values, str(position)], value)
        yield per_pos

    def render(self) -> bytes:
        return generate_latest(self.registry)
