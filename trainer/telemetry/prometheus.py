"""The per-rank Prometheus endpoint: the contract's metrics, labelled with the rank, served over HTTP.

Decisions:

- Each exporter has its own `CollectorRegistry` holding one collector that renders the current values at scrape
  time. Nothing touches prometheus_client's global registry, so several exporters live in one process (tests,
  a launcher hosting ranks) and no process or GC metrics leak in under foreign names.
- Values are kept in a dict under the contract's keys and read under a lock: `log` runs in the training thread,
  scrapes in the server's threads. A metric never logged is not exposed (no invented zeros); counters start at 0.
- The HTTP server runs in daemon threads, so a training thread stuck in a collective leaves the endpoint
  answering with a stale progress timestamp: exactly what the hang detector looks for.
- Port 0 asks the OS for a free port; `port` reports the one bound.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping

from prometheus_client import CollectorRegistry, generate_latest, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from trainer.contract.telemetry import METRICS, METRICS_BY_KEY, RANK_LABELS, MetricSpec, RankLabels


class PrometheusExporter:
    def __init__(
        self,
        labels: RankLabels,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        static: Mapping[str, float] | None = None,
        serve: bool = True,
    ):
        """static: values that never change (pid, process_start_time_seconds). serve=False renders only
        (`exposition()`), without a socket."""
        self.labels = labels
        self.label_values = tuple(labels.as_dict()[name] for name in RANK_LABELS)
        self._lock = threading.Lock()
        self._values: dict[str, float] = {m.key: 0.0 for m in METRICS if m.kind == "counter"}
        self.update(static or {})
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_RankCollector(self))
        self._server = self._thread = None
        if serve:
            try:
                self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)
            except OSError as e:
                raise RuntimeError(
                    f"telemetry.port: cannot serve metrics on {host}:{port}: {e.strerror}"
                ) from e
        self.host = host

    @property
    def port(self) -> int | None:
        return None if self._server is None else self._server.server_port

    @property
    def url(self) -> str | None:
        if self.port is None:
            return None
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def update(self, metrics: Mapping[str, float]) -> None:
        """Gauges take the value, counters add it; keys outside the contract are skipped."""
        resolved = [
            (spec, key, float(v)) for key, v in metrics.items() if (spec := _spec_for(key)) is not None
        ]
        with self._lock:
            for spec, key, value in resolved:
                if spec.kind == "counter":
                    self._values[key] = self._values.get(key, 0.0) + value
                else:
                    self._values[key] = value

    def snapshot(self) -> dict[str, float]:
        with self._lock:
            return dict(self._values)

    def exposition(self) -> str:
        """What a scrape returns now."""
        return generate_latest(self.registry).decode()

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=5)
            self._server = self._thread = None


def _spec_for(key: str) -> MetricSpec | None:
    base, _, label_value = key.partition("/")
    spec = METRICS_BY_KEY.get(base)
    if spec is None:
        return None
    if bool(spec.label) != bool(label_value) or (spec.label and label_value not in spec.label_values):
        expected = ", ".join(spec.keys)
        raise ValueError(f"metrics[{key!r}]: not a key of {spec.name}; expected {expected}")
    return spec


class _RankCollector(Collector):
    def __init__(self, exporter: PrometheusExporter):
        self._exporter = exporter

    def collect(self) -> Iterator[Metric]:
        values = self._exporter.snapshot()
        base_labels = self._exporter.label_values
        for spec in METRICS:
            if spec.kind == "counter":
                # The family is named without `_total`; its sample gets the suffix back.
                family = CounterMetricFamily(spec.name.removesuffix("_total"), spec.help, labels=spec.labels)
            else:
                family = GaugeMetricFamily(spec.name, spec.help, labels=spec.labels)
            for key in spec.keys:
                if key in values:
                    extra = (key.partition("/")[2],) if spec.label else ()
                    family.add_metric([*base_labels, *extra], values[key])
            yield family


class PrometheusSink:
    """The metric sink that feeds an exporter; the step index becomes the `step` gauge."""

    def __init__(self, exporter: PrometheusExporter):
        self.exporter = exporter

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        self.exporter.update({**metrics, "step": step})

    def close(self) -> None:
        self.exporter.close()
