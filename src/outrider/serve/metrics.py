"""Prometheus metrics of one server, named after vLLM's so that existing dashboards read them.

The counters only read each finished request's SpecStats (STYLE principle 8): the decoder counts,
this module adds the counts up. prometheus_client appends `_total` to counter names on the wire,
as vLLM's exporter does (`outrider:spec_decode_num_drafts_total`).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from outrider.stats import SpecStats

CONTENT_TYPE = CONTENT_TYPE_LATEST
# Seconds. A CPU serves tiny models in milliseconds and 1B models in seconds: the buckets span both.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)


class ServeMetrics:
    """One registry per server (not the process-global one), so that tests and several apps in
    one process do not share counts."""

    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        self.model_name = model_name
        r, m = self.registry, ["model_name"]
        self.num_drafts = Counter("outrider:spec_decode_num_drafts", "Steps that drafted at least one token.",
                                  m, registry=r)
        self.num_draft_tokens = Counter("outrider:spec_decode_num_draft_tokens",
                                        "Drafted tokens (tree nodes).", m, registry=r)
        self.num_accepted_tokens = Counter("outrider:spec_decode_num_accepted_tokens",
                                           "Drafted tokens the target accepted.", m, registry=r)
        self.accepted_per_pos = Counter(
            "outrider:spec_decode_num_accepted_tokens_per_pos",
            "Steps whose accepted path reached draft position `position` (0-based depth).",
            m + ["position"], registry=r)
        self.prompt_tokens = Counter("outrider:prompt_tokens", "Prompt tokens of finished requests.", m,
                                     registry=r)
        self.prompt_tokens_cached = Counter("outrider:prompt_tokens_cached",
                                            "Prompt tokens reused from the previous request's cache.", m,
                                            registry=r)
        self.generation_tokens = Counter("outrider:generation_tokens",
                                         "Committed (generated) tokens of finished requests.", m, registry=r)
        self.request_success = Counter("outrider:request_success", "Finished requests by finish reason.",
                                       m + ["finished_reason"], registry=r)
        self.ttft = Histogram("outrider:time_to_first_token_seconds",
                              "Arrival to the first committed token.", m, buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("outrider:time_per_output_token_seconds",
                              "Mean time per committed token after the first, per request.", m,
                              buckets=TOKEN_BUCKETS, registry=r)
        self.e2e = Histogram("outrider:e2e_request_latency_seconds", "Arrival to the last token.", m,
                             buckets=LATENCY_BUCKETS, registry=r)
        self.running = Gauge("outrider:num_requests_running", "Requests being generated.", m, registry=r)
        self.waiting = Gauge("outrider:num_requests_waiting", "Requests queued for the engine.", m, registry=r)
        self.running.labels(model_name).set(0)
        self.waiting.labels(model_name).set(0)
        # Every per-model series exists from the start, at 0 (Prometheus' advice for labelled
        # metrics): a dashboard's rate() works before the first request, and with --replicas an
        # idle replica still shows in /metrics rather than missing from it.
        for family in (self.num_drafts, self.num_draft_tokens, self.num_accepted_tokens, self.prompt_tokens,
                       self.prompt_tokens_cached, self.generation_tokens, self.ttft, self.tpot, self.e2e):
            family.labels(model_name)

    def set_queue(self, running: int, waiting: int) -> None:
        self.running.labels(self.model_name).set(running)
        self.waiting.labels(self.model_name).set(waiting)

    def request_finished(self, stats: SpecStats, finish_reason: str, ttft_s: float | None,
                         e2e_s: float) -> None:
        """Add one request's counts (aborted ones too: their tokens were computed)."""
        name = self.model_name
        self.num_drafts.labels(name).inc(stats.drafted_at[0] if stats.drafted_at else 0)
        self.num_draft_tokens.labels(name).inc(stats.drafted)
        self.num_accepted_tokens.labels(name).inc(stats.accepted)
        for position, count in enumerate(stats.accepted_at):
            self.accepted_per_pos.labels(name, str(position)).inc(count)
        self.prompt_tokens.labels(name).inc(stats.prompt_tokens)
        self.prompt_tokens_cached.labels(name).inc(stats.reused_tokens)
        self.generation_tokens.labels(name).inc(stats.new_tokens)
        self.request_success.labels(name, finish_reason).inc()
        if ttft_s is not None:
            self.ttft.labels(name).observe(ttft_s)
            if stats.new_tokens > 1:
                self.tpot.labels(name).observe((e2e_s - ttft_s) / (stats.new_tokens - 1))
        self.e2e.labels(name).observe(e2e_s)

    def render(self) -> bytes:
        return generate_latest(self.registry)
