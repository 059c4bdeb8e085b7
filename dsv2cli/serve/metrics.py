"""The server's Prometheus metrics (``GET /metrics``), in a registry of its own per server."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Seconds: a first token after a long prompt on a CPU takes seconds; steps take milliseconds.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("dsv2_requests", "Requests answered, by endpoint and status.", ["endpoint", "status"], registry=r)
        self.finished = Counter("dsv2_finished_requests", "Requests that ended, by finish reason.", ["reason"], registry=r)
        self.prompt_tokens = Counter("dsv2_prompt_tokens", "Prompt tokens of requests that ran.", registry=r)
        self.cached_tokens = Counter(
            "dsv2_prompt_cached_tokens", "Prompt tokens whose entries came from the prefix cache.", registry=r
        )
        self.generated_tokens = Counter("dsv2_generation_tokens", "Tokens generated.", registry=r)
        self.queue = Gauge("dsv2_queue_length", "Requests waiting for a row of the batch.", registry=r)
        self.running = Gauge("dsv2_running_requests", "Requests decoding in the batch.", registry=r)
        self.cache_bytes = Gauge("dsv2_latent_cache_bytes", "Bytes of the running batch's latent cache.", registry=r)
        self.prefix_bytes = Gauge("dsv2_prefix_cache_bytes", "Bytes held by the prefix cache.", registry=r)
        self.prefix_hit_rate = Gauge(
            "dsv2_prefix_cache_hit_rate", "Prompt tokens served from the prefix cache / prompt tokens.", registry=r
        )
        self.ttft = Histogram(
            "dsv2_time_to_first_token_seconds", "From a request's arrival to its first token.", buckets=TTFT_BUCKETS, registry=r
        )
        self.itl = Histogram(
            "dsv2_inter_token_latency_seconds", "Between two tokens of one request.", buckets=ITL_BUCKETS, registry=r
        )
        self.step_rows = Histogram("dsv2_batch_rows", "Live rows per decode step.", buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)
        self.prefill_prompts = Histogram(
            "dsv2_prefill_prompts",
            "Prompts per prefill forward (admitted together).",
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=r,
        )
        self.expert_load = Gauge(
            "dsv2_expert_load",
            "Tokens routed to each expert of each MoE layer by the current (or last) expert record.",
            ["layer", "expert"],
            registry=r,
        )

    def set_expert_loads(self, document: dict) -> None:
        """``/metrics`` shows the loads of :meth:`ExpertRecorder.document` ``document``."""
        for layer, counts in zip(document["layers"], document["loads"], strict=True):
            for expert, count in enumerate(counts):
                self.expert_load.labels(str(layer), str(expert)).set(count)

    def render(self) -> bytes:
        return generate_latest(self.registry)
