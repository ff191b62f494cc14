"""What replicator tells Prometheus.

`replicator run --metrics HOST:PORT` serves a branch's own view, per stream: how far behind
its source it is, what it applied and set aside, when it last applied, its errors by kind,
and the process's CPU and memory.  `replicator hq metrics` serves HQ's view of the whole
fleet from replication.branches, so one scrape shows every store, including the ones whose
own replicator is down.  Metric names are the contract of config/alerts.yaml and
config/grafana-dashboard.json (tests check both against what is served here).
"""
from __future__ import annotations

import logging
import time
import weakref
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, PlatformCollector, ProcessCollector, \
    start_http_server
from prometheus_client.core import GaugeMetricFamily

from .errors import ConfigError, ReplicatorError

log = logging.getLogger(__name__)

_LABELS = ("stream", "branch")


def parse_listen(value: str, option: str = "--metrics") -> tuple[str, int]:
    """HOST:PORT (or :PORT for every interface) as the address to serve on."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"expected HOST:PORT, such as 127.0.0.1:9187 (got {value!r})", None, None, option)
    return host.strip("[]") or "0.0.0.0", int(port)


def serve(registry: CollectorRegistry, listen: str, option: str = "--metrics"):
    """Start the /metrics endpoint in a thread; return its server (shutdown() it at exit)."""
    host, port = parse_listen(listen, option)
    try:
        server, _thread = start_http_server(port, addr=host, registry=registry)
    except OSError as e:
        raise ReplicatorError(f"cannot serve metrics on {host}:{port}: {e.strerror or e}; "
                              f"choose another {option} address") from None
    log.info("serving Prometheus metrics on http://%s:%d/metrics", host, port)
    return server


_FAMILIES: "weakref.WeakKeyDictionary[CollectorRegistry, dict]" = weakref.WeakKeyDictionary()


def _families(registry: CollectorRegistry):
    """Each metric family once per registry: the streams of one run share them (by labels)."""
    made = _FAMILIES.setdefault(registry, {})

    def family(cls, name: str, doc: str, labels):
        if name not in made:
            made[name] = cls(name, doc, labels, registry=registry)
        return made[name]
    return family


class StreamMetrics:
    """One stream's metrics in a run (a registry of its own: tests and the demo run several)."""

    def __init__(self, stream: str, branch: str, registry: CollectorRegistry | None = None):
        """registry: another stream's of the same run, so one endpoint serves both."""
        if registry is None:
            registry = CollectorRegistry()
            ProcessCollector(registry=registry)
            PlatformCollector(registry=registry)
        self.registry = registry
        r, labels = self.registry, dict(stream=stream, branch=branch)
        self.synced_at = time.time()      # source time of the newest state the target fully holds;
        # run sets it from the position's last move at start, so a branch back from a day off
        # shows a day of lag until it has caught up
        fam = _families(r)
        self.lag = fam(Gauge, "replicator_lag_seconds", "Age of the source state the target fully holds: "
                       "seconds since the source snapshot this stream last caught up with", _LABELS).labels(**labels)
        self.lag.set_function(lambda: max(0.0, time.time() - self.synced_at))
        self.applied = fam(Counter, "replicator_changes_applied", "Changes applied to the target",
                           _LABELS).labels(**labels)
        self.set_aside = fam(Gauge, "replicator_rows_set_aside", "Changes the target refused, set aside and "
                             "waiting (replicator set-aside list)", _LABELS).labels(**labels)
        self.last_apply = fam(Gauge, "replicator_last_apply_timestamp_seconds", "Unix time of the last "
                              "transaction that applied changes", _LABELS).labels(**labels)
        self._errors = fam(Counter, "replicator_errors", "Errors by kind: connection (an outage, retried), "
                           "position_report (the source refused it), fatal (run stopped)", (*_LABELS, "kind"))
        self._labels = labels
        for kind in ("connection", "position_report", "fatal"):
            self._errors.labels(**labels, kind=kind)      # every series exists from the start

    def error(self, kind: str) -> None:
        self._errors.labels(**self._labels, kind=kind).inc()

    def since(self, moved_at: float) -> None:
        self.synced_at = moved_at

    def caught_up(self, probed_at: float) -> None:
        """The target holds everything the source had committed at `probed_at` (wall time)."""
        self.synced_at = max(self.synced_at, probed_at)


class FleetCollector:
    """HQ's view of every registered branch, read from HQ at each scrape."""

    def __init__(self, statuses: Callable[[], list], log_age: Callable[[], float | None], retention: float):
        self.statuses = statuses
        self.log_age = log_age
        self.retention = retention

    def describe(self):
        return []           # no scrape at registration

    def collect(self):
        labels = ["branch"]
        up = GaugeMetricFamily("replicator_hq_up", "1 when HQ answered this scrape")
        fams = {
            "report": GaugeMetricFamily("replicator_branch_last_report_timestamp_seconds",
                                        "Unix time of the branch's last position report", labels=labels),
            "lag": GaugeMetricFamily("replicator_branch_lag_seconds", "Age of the oldest change HQ committed "
                                     "that the branch has not reported applied (0: none)", labels=labels),
            "pending": GaugeMetricFamily("replicator_branch_pending_changes", "Changes committed at HQ the "
                                         "branch has not reported applied", labels=labels),
            "aside": GaugeMetricFamily("replicator_branch_rows_set_aside", "Changes the branch reports set "
                                       "aside", labels=labels),
            "stale": GaugeMetricFamily("replicator_branch_stale", "1 for an active branch that has not "
                                       "reported its position for 5 minutes (or never)", labels=labels),
            "active": GaugeMetricFamily("replicator_branch_active", "1 for an active branch, 0 deactivated",
                                        labels=labels),
        }
        log_fams = [GaugeMetricFamily("replicator_hq_retention_seconds", "The log retention hq.yaml asks for"),
                    GaugeMetricFamily("replicator_hq_log_oldest_seconds", "Age of the oldest change HQ's log "
                                      "holds (well past the retention: prune is not running, or a branch "
                                      "holds the log)")]
        log_fams[0].add_metric([], self.retention)
        try:
            rows = self.statuses()
            age = self.log_age()
        except Exception as e:      # a scrape never raises: HQ being down is itself the news
            log.warning("fleet metrics: cannot read HQ: %s", e)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        log_fams[1].add_metric([], age or 0.0)
        yield from log_fams
        for b in rows:
            fams["active"].add_metric([b.name], 1 if b.active else 0)
            fams["stale"].add_metric([b.name], 1 if b.stale() else 0)
            fams["aside"].add_metric([b.name], b.set_aside or 0)
            if b.acked_at is not None:
                fams["report"].add_metric([b.name], b.acked_at.timestamp())
            if b.pending is not None:
                fams["pending"].add_metric([b.name], b.pending)
                fams["lag"].add_metric([b.name], b.lag.total_seconds() if b.lag is not None else 0.0)
        yield from fams.values()


def fleet_registry(statuses: Callable[[], list], log_age: Callable[[], float | None],
                   retention: float) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(FleetCollector(statuses, log_age, retention))
    return registry
