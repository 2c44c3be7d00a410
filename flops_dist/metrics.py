"""Prometheus metrics of a run, served by the coordinator from a registry of its own.

Names follow Prometheus conventions: a `flops_` prefix, base units in the name (`_seconds`,
`_bytes`), `_total` on counters, and labels from small fixed sets only (never a step, seed or
example id). Several runs (and tests) can live in one process because nothing uses the global
registry.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from .record import LAMBDA_NAMES, StepRecord



def peak_rss_bytes() -> int:
    """This process's peak resident memory (VmHWM on Linux)."""
    import resource
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class RunMetrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.steps = Counter("flops_steps", "Optimizer steps completed.", registry=r)
        self.queries = Counter("flops_queries", "Perturbed forward queries evaluated.", registry=r)
        self.dropped = Counter("flops_dropped_queries", "Queries dropped for a NaN or inf loss.", registry=r)
        self.update_bytes = Counter("flops_update_bytes", "Bytes of update messages sent to each replica.",
                                    registry=r)
        self.worker_restarts = Counter("flops_worker_restarts", "Workers replaced after dying.", registry=r)
        self.step_seconds = Histogram("flops_step_duration_seconds", "Wall time of one step.", registry=r,
                                      buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.loss = Gauge("flops_train_loss", "Mean clean loss of the last batch.", registry=r)
        self.allocation = Gauge("flops_allocation_queries", "Queries per example in the last step's allocation "
                                "(units: pairs for the antithetic estimator).", ["stat"], registry=r)
        self.gini = Gauge("flops_allocation_gini", "Gini coefficient of the last allocation (0 is uniform).",
                          registry=r)
        self.variance = Gauge("flops_variance_proxy", "Estimated trace of the gradient estimate's variance, "
                              "Σ ĉ_j/A_j / B².", registry=r)
        self.allocator_lambda = Gauge("flops_allocator_lambda", "The flops allocator's parameters λ.", ["param"],
                                      registry=r)
        self.test_metric = Gauge("flops_test_metric", "Held-out data.metric at θ, from its last scoring "
                                 "(output.score_every).", ["metric"], registry=r)
        self.workers_alive = Gauge("flops_workers_alive", "Workers holding a live replica.", registry=r)
        self.worker_rate = Gauge("flops_worker_query_rate", "Measured queries per second of each worker slot.",
                                 ["worker"], registry=r)
        self.server = None

    def serve(self, address: str, port: int) -> int:
        """Serve /metrics; returns the bound port (port 0 picks a free one)."""
        self.server, _ = start_http_server(port, addr=address, registry=self.registry)
        return self.server.server_port

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    def record(self, record: StepRecord, worker_rates: list[float], workers_alive: int) -> None:
        self.steps.inc()
        self.queries.inc(record.queries)
        self.dropped.inc(record.dropped_queries)
        self.update_bytes.inc(record.update_bytes)
        self.step_seconds.observe(record.seconds)
        self.loss.set(record.loss)
        for stat in ("min", "mean", "max"):
            self.allocation.labels(stat).set(getattr(record, f"allocation_{stat}"))
        self.gini.set(record.allocation_gini)
        self.variance.set(record.variance_proxy)
        for name in LAMBDA_NAMES:
            value = getattr(record, f"lambda_{name}")
            if value == value:  # only the flops allocator has λ
                self.allocator_lambda.labels(name).set(value)
        self.workers_alive.set(workers_alive)
        for slot, rate in enumerate(worker_rates):
            self.worker_rate.labels(str(slot)).set(rate)
