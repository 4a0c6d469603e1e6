"""The server's Prometheus metrics (`GET /metrics`) and the running moments of the rewards it served (`GET /stats`)."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest

from pipeline.api_error import ApiError

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
REWARD_BUCKETS = (-8.0, -4.0, -2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0, 4.0, 8.0)


class ServeMetrics:
    """The server's Prometheus metrics, in a registry of its own (one per app: two apps in a process never
    share counters)."""

    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("modrm_requests", "Requests answered, by endpoint", ["endpoint"], registry=r)
        self.errors = Counter(
            "modrm_request_errors",
            "Requests refused or failed, by endpoint and status",
            ["endpoint", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "modrm_request_latency_seconds",
            "Time to answer, by endpoint",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "modrm_batch_trajectories", "Trajectories per model call", buckets=BATCH_BUCKETS, registry=r
        )
        self.queue_depth = Gauge("modrm_queue_trajectories", "Trajectories waiting for the model", registry=r)
        self.encoded = Counter("modrm_texts_encoded", "Texts run through the encoder", registry=r)
        self.cached = Counter("modrm_texts_from_cache", "Texts whose embedding came from the LRU", registry=r)
        self.heads = Info("modrm_heads", "The version of the heads served", registry=r)
        self.refreshes = Counter("modrm_refreshes", "Refreshes of the heads, by result", ["result"], registry=r)
        self.module_reward = Histogram(
            "modrm_module_reward", "Rewards served, by module", ["module"], buckets=REWARD_BUCKETS, registry=r
        )

    @contextmanager
    def timed(self, endpoint: str) -> Iterator[None]:
        """Counts one request to `endpoint`, its latency, and its error status should it fail."""
        start = time.perf_counter()
        try:
            yield
        except ApiError as err:
            self.errors.labels(endpoint, str(err.status)).inc()
            raise
        except Exception:
            self.errors.labels(endpoint, "500").inc()
            raise
        finally:
            self.requests.labels(endpoint).inc()
            self.latency.labels(endpoint).observe(time.perf_counter() - start)

    def text(self) -> bytes:
        return generate_latest(self.registry)


class RewardStats:
    """Running count, mean and std of each module's served rewards (Welford's update), for a loop that
    normalises advantages per module."""

    def __init__(self, modules: list[str]):
        self.moments = {m: (0, 0.0, 0.0) for m in modules}  # count, mean, sum of squared deviations

    def add(self, scores: list[dict[str, float | None]]) -> None:
        for rewards in scores:
            for module, reward in rewards.items():
                if reward is not None:
                    n, mean, m2 = self.moments[module]
                    delta = reward - mean
                    mean += delta / (n + 1)
                    self.moments[module] = (n + 1, mean, m2 + delta * (reward - mean))

    def summary(self) -> dict[str, dict[str, float | int | None]]:
        return {
            m: {"count": n, "mean": mean if n else None, "std": math.sqrt(m2 / n) if n else None}
            for m, (n, mean, m2) in self.moments.items()
        }
