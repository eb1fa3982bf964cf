"""Many replicas seen as one service: what `/v1/stats` and `/metrics` answer under Ray Serve.

Ray Serve sends each HTTP request to one replica, so a replica alone knows only its own queue and
latencies. Every replica therefore reports its `ImageService.stats()` (and its Prometheus text) to one
`StatsBoard` about once a second; the replica that answers `/v1/stats` merges the fresh reports:

- the top level has the same keys as one service's stats (state, queue, counts, latency, recent,
  last_steps_ms, gpu, ...), summed or merged over the replicas, so the dashboard draws the whole
  deployment unchanged;
- `replicas`: each replica's own stats, with `replica` (its Ray Serve id) and `age_s` (of its report);
- `totals`: replicas (ready / all), requests waiting and running, completed, images per second over
  the last minute.

A replica that stopped reporting (killed, or its node gone) is left out after `STALE_AFTER_S`.
Nothing here imports ray: `StatsBoard` becomes an actor where the deployment is made.
"""

from __future__ import annotations

import time
from typing import Any

from prometheus_client.core import CollectorRegistry, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from ..runtime.telemetry import summarize
from .outcome import json_finite, task_summary

REPORT_PERIOD_S = 1.0
STALE_AFTER_S = 5.0
RECENT_KEPT = 200  # as one service's stats keep: the dashboard's charts
THROUGHPUT_WINDOW_S = 60.0
REPLICA_LABEL = "replica"


class StatsBoard:
    """The latest report of each replica: (time, stats dict, Prometheus text). One per application."""

    def __init__(self):
        self._reports: dict[str, tuple[float, dict, str]] = {}

    def put(self, replica: str, stats: dict, metrics_text: str = "") -> None:
        self._reports[replica] = (time.time(), stats, metrics_text)

    def remove(self, replica: str) -> None:
        self._reports.pop(replica, None)

    def collect(self, max_age_s: float = STALE_AFTER_S) -> list[tuple[str, float, dict, str]]:
        """(replica, age_s, stats, metrics_text) of every replica heard from within `max_age_s`, by id."""
        now = time.time()
        for replica in [r for r, (at, _, _) in self._reports.items() if now - at > max_age_s]:
            del self._reports[replica]  # gone: a restarted replica reports under a new id
        return [(replica, now - at, stats, text) for replica, (at, stats, text) in sorted(self._reports.items())]


def _overall_state(states: list[str]) -> str:
    if not states:
        return "loading"
    if all(s == "ready" for s in states):
        return "ready"
    if any(s == "ready" for s in states):
        return "degraded"  # some replicas serve, others load, restart or failed
    return states[0]


def merge_stats(reports: list[tuple[str, float, dict]], now: float | None = None) -> dict[str, Any]:
    """One stats dict for the deployment from each replica's (replica id, report age in s, stats)."""
    now = time.time() if now is None else now
    replicas = [{"replica": replica, "age_s": age, **stats} for replica, age, stats in reports]
    states = [r.get("state", "loading") for r in replicas]
    queues = [r.get("queue") or {} for r in replicas]
    running = [dict(q["running"], replica=r["replica"]) for r, q in zip(replicas, queues) if q.get("running")]
    waiting = sorted((dict(w, replica=r["replica"]) for r, q in zip(replicas, queues) for w in q.get("waiting", [])),
                     key=lambda w: (w.get("eta_start_s") or 0.0, w.get("waited_s") or 0.0))
    counts: dict[str, int] = {}
    for r in replicas:
        for name, value in (r.get("counts") or {}).items():
            counts[name] = counts.get(name, 0) + value
    recent = sorted((dict(e, replica=r["replica"]) for r in replicas for e in r.get("recent", [])),
                    key=lambda e: e.get("t", 0.0))[-RECENT_KEPT:]
    latency_names = sorted({name for r in replicas for name in (r.get("latency") or {})})
    latency = {name: summarize(e[name] for e in recent if e.get(name) is not None) for name in latency_names}
    sizes: list[str] = []
    for r in replicas:
        sizes += [s for s in r.get("sizes", []) if s not in sizes]
    newest = max(replicas, key=lambda r: (r.get("recent") or [{}])[-1].get("t", 0.0), default=None)
    gpus = [dict(r["gpu"], replica=r["replica"]) for r in replicas if r.get("gpu")]
    images_last_window = sum(e.get("n", 1) for e in recent if now - e.get("t", 0.0) <= THROUGHPUT_WINDOW_S)
    ready = sum(1 for s in states if s == "ready")
    merged = {
        "state": _overall_state(states),
        "ready": ready > 0,
        "failure": next((r["failure"] for r in replicas if r.get("failure")), None),
        "device": ", ".join(str(r.get("device")) for r in replicas) or None,
        "uptime_s": max((r.get("uptime_s") or 0.0 for r in replicas), default=0.0),
        "sizes": sizes,
        "any_size": any(r.get("any_size") for r in replicas),
        "queue": {"depth": sum(q.get("depth", 0) for q in queues), "max": sum(q.get("max", 0) for q in queues),
                  "running": running[0] if running else None, "running_all": running, "waiting": waiting},
        "counts": counts,
        "latency": latency,
        "recent": recent,
        "last_steps_ms": list(newest.get("last_steps_ms", [])) if newest is not None else [],
        "gpu": gpus[0] if gpus else {},  # the first replica's card; every card is in `gpus`
        "gpus": gpus,
        "pipeline": replicas[0].get("pipeline", {}) if replicas else {},
        "tasks": task_summary(dict.fromkeys(t for r in replicas for t in (r.get("tasks") or {}).get("served", [])),
                              [e for e in recent if "task" in e]),
        "replicas": replicas,
        "totals": {
            "replicas": len(replicas), "ready_replicas": ready,
            "waiting": len(waiting), "running": len(running), "completed": counts.get("completed", 0),
            "images_per_s": images_last_window / THROUGHPUT_WINDOW_S, "window_s": THROUGHPUT_WINDOW_S,
        },
    }
    return json_finite(merged)  # (an empty summary is all NaN, which JSON has no word for)


def merge_metrics(reports: list[tuple[str, str]]) -> bytes:
    """Prometheus text of several replicas as one exposition, each sample labelled `replica="ID"`."""
    families: dict[str, Metric] = {}
    for replica, text in reports:
        for family in text_string_to_metric_families(text):
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
            merged.samples += [sample._replace(labels={**sample.labels, REPLICA_LABEL: replica})
                               for sample in family.samples]

    class _Reports:
        def collect(self):
            return iter(families.values())

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Reports())
    return generate_latest(registry)
