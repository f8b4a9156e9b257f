"""Prometheus metrics, on an explicit registry, every series labelled with `model_name`.

Names follow Prometheus conventions: the `hguard_` prefix, `_total` counters, `_seconds` histograms,
no colons. Probability histograms have buckets in [0, 1]; latency buckets span a CPU-hosted small
model to a large one on a GPU. `Metrics` is what the server records into; it keeps no state of its
own beyond the collectors, so many replicas can be scraped and summed.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401  (re-exported for the route)

PROBABILITY_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
STEP_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2)


class Metrics:
    def __init__(self, model_name: str, registry: CollectorRegistry | None = None) -> None:
        self.model_name = model_name
        self.registry = registry or CollectorRegistry()
        self._children: dict[tuple, object] = {}
        r, m = self.registry, ["model_name"]

        def counter(name, doc, *labels):
            return Counter(name, doc, [*m, *labels], registry=r)

        def histogram(name, doc, buckets):
            return Histogram(name, doc, m, buckets=buckets, registry=r)

        self.requests = counter("hguard_requests_total", "Finished requests", "endpoint", "status", "action", "verdict")
        self.prompt_tokens = counter("hguard_prompt_tokens_total", "Prompt tokens processed")
        self.generation_tokens = counter("hguard_generation_tokens_total", "Tokens generated")
        self.tokens_scored = counter("hguard_tokens_scored_total", "Tokens given a hallucination probability")
        self.flagged_tokens = counter("hguard_flagged_tokens_total", "Tokens at or above the threshold")
        self.abstentions = counter("hguard_abstentions_total", "Sequences stopped by the guard")
        self.dampened = counter("hguard_dampened_sequences_total", "Sequences whose H-Neurons were scaled")
        self.upstream_errors = counter("hguard_upstream_errors_total", "Proxy-mode upstream failures", "kind")
        self.response_probability = histogram("hguard_response_hallucination_probability",
                                              "Response-level hallucination probability", PROBABILITY_BUCKETS)
        self.token_probability = histogram("hguard_token_hallucination_probability",
                                           "Per-token hallucination probability", PROBABILITY_BUCKETS)
        self.time_to_first_token = histogram("hguard_time_to_first_token_seconds", "Arrival to first token",
                                             LATENCY_BUCKETS)
        self.inter_token_latency = histogram("hguard_inter_token_latency_seconds", "Between streamed tokens",
                                             LATENCY_BUCKETS)
        self.request_latency = histogram("hguard_request_latency_seconds", "Arrival to last token", LATENCY_BUCKETS)
        self.queue_time = histogram("hguard_queue_time_seconds", "Arrival to the start of generation",
                                    LATENCY_BUCKETS)
        self.probe_step = histogram("hguard_probe_step_seconds", "Host time in the guard's hooks per decoding step",
                                    STEP_BUCKETS)
        self.queue_depth = Gauge("hguard_queue_depth", "Requests waiting", m, registry=r)
        self.running = Gauge("hguard_running_requests", "Requests being generated", m, registry=r)
        # create every series up front, so dashboards show zeros instead of "no data" before the first event
        for metric in (self.prompt_tokens, self.generation_tokens, self.tokens_scored, self.flagged_tokens,
                       self.abstentions, self.dampened, self.response_probability, self.token_probability,
                       self.time_to_first_token, self.inter_token_latency, self.request_latency, self.queue_time,
                       self.probe_step, self.queue_depth, self.running):
            self.labels(metric)
        for kind in ("502", "504"):
            self.labels(self.upstream_errors, kind=kind)

    def labels(self, metric, **labels):
        """The child series of `metric` for this model and `labels`, cached (label lookups are not free)."""
        key = (id(metric), *sorted(labels.items()))
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(model_name=self.model_name, **labels)
        return child

    def request(self, endpoint: str, status: int, action: str | None = "", verdict: str = "",
                prompt_tokens: int | None = None, latency: float | None = None) -> None:
        """One finished request: hosted, proxied, or refused (no action, verdict or tokens). `action`
        None: the guard was off."""
        self.labels(self.requests, endpoint=endpoint, status=str(status), action="off" if action is None else action,
                    verdict=verdict).inc()
        if prompt_tokens is not None:
            self.labels(self.prompt_tokens).inc(prompt_tokens)
        if latency is not None:
            self.labels(self.request_latency).observe(latency)

    def answer(self, token_probs: list[float], probability: float | None, verdict: str, threshold: float) -> None:
        """One scored answer (a hosted choice, or an upstream's answer in proxy mode): its tokens'
        probabilities, its response probability and what the guard did."""
        if token_probs:
            self.labels(self.tokens_scored).inc(len(token_probs))
            self.labels(self.flagged_tokens).inc(sum(p >= threshold for p in token_probs))
            histogram = self.labels(self.token_probability)
            for p in token_probs:
                histogram.observe(p)
        if probability is not None:
            self.labels(self.response_probability).observe(probability)
        if verdict == "abstained":
            self.labels(self.abstentions).inc()
        elif verdict == "dampened":
            self.labels(self.dampened).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
