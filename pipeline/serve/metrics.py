"""The service's Prometheus metrics at /metrics: requests by route and status, their latency, the model's
batches and queue, and the index version served and its age.

Each app has a registry of its own (tests run several apps in one process). Request counts come from an
ASGI middleware around everything else, so that refusals made before a body is read (401, 413, 421) count
too; the rest is read from the service when Prometheus scrapes.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import datetime
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

if TYPE_CHECKING:
    from .service import Service

METRICS_PATH = "/metrics"
# Route labels: a fixed set, so that no client can grow the series (ids and versions are not labels).
ROUTES = (
    "/api/search",
    "/api/thumbnail",
    "/api/fields",
    "/api/health",
    "/api/stats",
    "/api/session",
    "/api/images",
    METRICS_PATH,
    "/static",
)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def route_of(path: str) -> str:
    """The route label of a request path: one of ROUTES, "/" for the page, "other" for anything else."""
    if path == "/":
        return "/"
    return next((r for r in ROUTES if path == r or path.startswith(r + "/")), "other")


class ServiceMetrics:
    """The registry of one app: request counters and latencies, and a collector reading `service`."""

    def __init__(self, service: Service) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "pipeline_http_requests", "HTTP requests answered", ["route", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "pipeline_http_request_duration_seconds",
            "Time from a request's arrival to the end of its answer",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(ServiceCollector(service))

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class ServiceCollector(Collector):
    """What the service is doing, read at each scrape."""

    def __init__(self, service: Service) -> None:
        self.service = service

    def collect(self) -> Iterator[Metric]:
        s = self.service
        yield GaugeMetricFamily("pipeline_up", "1 once the index and the model are loaded", value=float(s.ready))
        if not s.ready or s.batcher is None:
            return
        batcher = s.batcher
        sizes = batcher.batch_sizes
        cumulative, buckets = 0, []
        for size in range(1, s.batch_size + 1):
            cumulative += sizes.get(size, 0)
            buckets.append((str(size), cumulative))
        buckets.append(("+Inf", batcher.batches))
        yield HistogramMetricFamily(
            "pipeline_model_batch_size", "Images per model run", buckets=buckets, sum_value=batcher.images
        )
        yield CounterMetricFamily("pipeline_model_images", "Images embedded by the model", value=batcher.images)
        yield GaugeMetricFamily("pipeline_model_queue_images", "Images waiting for the model", value=batcher.waiting())
        yield GaugeMetricFamily(
            "pipeline_model_queue_capacity", "Images that may wait before requests answer 503", value=s.queue_size
        )
        yield GaugeMetricFamily(
            "pipeline_decode_memory_bytes",
            "Bytes the uploads being decoded take (images.decode_cost)",
            value=s.decode_budget.used,
        )
        yield GaugeMetricFamily(
            "pipeline_decode_memory_limit_bytes",
            "Bytes uploads being decoded may take at once",
            value=s.decode_budget.total,
        )
        abandoned = CounterMetricFamily(
            "pipeline_abandoned_work", "Work stopped at a request's deadline (not done), by stage", labels=["stage"]
        )
        for stage in ("decode", "search"):
            abandoned.add_metric([stage], s.abandoned.get(stage, 0))
        yield abandoned
        searcher = s.searcher
        swaps = s.swaps()
        info = GaugeMetricFamily(
            "pipeline_index_version_info",
            "The index version served and the one published",
            labels=["served", "published"],
        )
        info.add_metric([searcher.version_dir.name, swaps["published"] or ""], 1.0)
        yield info
        yield GaugeMetricFamily("pipeline_index_images", "Images in the version served", value=searcher.count)
        created = searcher.meta.get("created")
        if created:
            age = time.time() - datetime.fromisoformat(created).timestamp()
            yield GaugeMetricFamily(
                "pipeline_index_version_age_seconds", "Seconds since the version served was built", value=age
            )
        yield GaugeMetricFamily(
            "pipeline_index_serving_published",
            "1 when the version served is the published one (0: see /api/health's refused)",
            value=float(swaps["serving_published"]),
        )
        live = searcher.live
        if live is not None:
            live.sync()
        yield GaugeMetricFamily(
            "pipeline_live_additions",
            "Images added since the version served was built, searched beside it (folded in by the nightly job)",
            value=0 if live is None else len(live),
        )
        yield GaugeMetricFamily(
            "pipeline_live_excluded",
            "Images of the version served (or additions) removed or hidden since, never returned",
            value=0 if live is None else len(live.excluded),
        )
        changes = CounterMetricFamily(
            "pipeline_collection_changes", "Additions and removals made through this service", labels=["change"]
        )
        changes.add_metric(["added"], s.added)
        changes.add_metric(["removed"], s.removed)
        yield changes
        yield GaugeMetricFamily(
            "pipeline_model_file_changed",
            "1 when the model file was replaced on disk since the service loaded it",
            value=float(swaps["model_file_changed"]),
        )


class Measured:
    """ASGI middleware, outermost: counts every answer by route and status and times it to its last byte."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route, t0, status = route_of(scope["path"]), time.perf_counter(), 500

        async def measured(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, measured)
        finally:
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - t0)
