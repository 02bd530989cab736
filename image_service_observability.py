"""Observability: what the service tells its operators about itself.

This module owns the Prometheus series (``Metrics``, served on
METRICS_PORT), the timing of MongoDB commands from the driver's own
monitoring, the log format (text or JSON lines, secrets redacted), and the
health monitor that keeps the standard gRPC health service in step with
MongoDB (and checks the indexes once, when MongoDB first answers).
"""

import asyncio
import collections
import json
import logging
import sys
from concurrent import futures

import prometheus_client
import pymongo
import pymongo.monitoring
from grpc_health.v1 import health_pb2

import image_service_pb2 as pb2
from image_service_settings import redact
from image_service_store import warn_about_missing_indexes

log = logging.getLogger("image_service.health")


class Metrics:
    """The Prometheus series, in a registry of the server's own. No label
    holds a model id, a peer or a secret: only methods, statuses, outcomes
    and command names, all from small fixed sets."""

    # gRFC A66's latency buckets (seconds), from 100 us to 100 s.
    BUCKETS = (0.0001, 0.0003, 0.0006, 0.001, 0.002, 0.004, 0.006, 0.01, 0.016, 0.025, 0.04, 0.065, 0.1,
               0.16, 0.25, 0.4, 0.65, 1, 2, 5, 10, 20, 50, 100)

    def __init__(self):
        self.registry = prometheus_client.CollectorRegistry()
        series = {"registry": self.registry}
        self.call_duration = prometheus_client.Histogram(
            "grpc_server_call_duration_seconds",
            "Time from a call's arrival to its status, by method and status.",
            ["grpc_method", "grpc_status"], buckets=self.BUCKETS, **series)
        self.deletions = prometheus_client.Counter(
            "image_service_deletions", "Model ids answered by real (not dry-run) deletes, by outcome.",
            ["outcome"], **series)
        self.images_deleted = prometheus_client.Counter(
            "image_service_images_deleted",
            "images metadata documents removed, as MongoDB reported.", **series)
        self.files_deleted = prometheus_client.Counter(
            "image_service_files_deleted",
            "GridFS files removed with their chunks, as MongoDB reported.", **series)
        self.mongodb_command_duration = prometheus_client.Histogram(
            "image_service_mongodb_command_duration_seconds",
            "MongoDB commands, timed by the driver, by command.",
            ["command"], buckets=self.BUCKETS, **series)
        self.mongodb_up = prometheus_client.Gauge(
            "image_service_mongodb_up",
            "1 while MongoDB answers the health ping, 0 while it does not.", **series)
        self.calls_in_flight = prometheus_client.Gauge(
            "image_service_calls_in_flight", "ImageService calls admitted and not yet ended.", **series)

    def count(self, replies):
        """Counts a call's results, a few updates per call even for a batch
        of 1000 (this runs on the event loop)."""
        for outcome, number in collections.Counter(reply.outcome for reply in replies).items():
            self.deletions.labels(pb2.Outcome.Name(outcome)).inc(number)
        self.images_deleted.inc(sum(reply.deleted_images for reply in replies))
        self.files_deleted.inc(sum(reply.deleted_files for reply in replies))


class CommandTimer(pymongo.monitoring.CommandListener):
    """Feeds the driver's own command monitoring into a histogram by command name."""

    def __init__(self, histogram):
        self._histogram = histogram

    def started(self, event):
        pass

    def succeeded(self, event):
        self._histogram.labels(event.command_name).observe(event.duration_micros / 1e6)

    failed = succeeded


class MongoHealthMonitor:
    """Keeps the standard health service in step with MongoDB: SERVING while
    a ping answers within the timeout, NOT_SERVING while it does not. Pings
    run on a thread of their own, so they never wait behind deletes.

    Once MongoDB first answers, the indexes are checked, once, apart from
    health: a check that fails (a user whose role lacks ``listIndexes``, say)
    is one WARNING that it could not check, and health stays about the ping."""

    def __init__(self, health_servicer, service_names, db, interval_s, timeout_s, up_gauge,
                 index_check_timeout_s=None):
        self._health = health_servicer
        self._service_names = service_names
        self._db = db
        self._interval_s = interval_s
        self._timeout_s = timeout_s
        self._index_check_timeout_s = index_check_timeout_s or timeout_s
        self._up = up_gauge
        self._indexes_checked = False
        self.first_check_done = asyncio.Event()
        self._thread = futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="mongo-health")
        self._task = None
        self._last_status = None

    def start(self):
        self._task = asyncio.ensure_future(self._run())

    def stop(self):
        if self._task:
            self._task.cancel()
        self._thread.shutdown(wait=False)

    def _ping(self):
        with pymongo.timeout(self._timeout_s):
            self._db.client.admin.command("ping")

    def _check_indexes(self):
        """Warns about missing indexes; any failure to look is one warning."""
        try:
            with pymongo.timeout(self._index_check_timeout_s):
                warn_about_missing_indexes(self._db)
        except Exception as error:  # Not health's business: deletes work without the check.
            hint = " (the check needs the listIndexes action)" if getattr(error, "code", None) == 13 else ""
            log.warning("could not check the indexes: %s: %s; serving regardless%s", type(error).__name__,
                        _first_line(error), hint)

    async def check(self):
        """Pings MongoDB once and publishes the result."""
        try:
            await asyncio.get_running_loop().run_in_executor(self._thread, self._ping)
            status = health_pb2.HealthCheckResponse.SERVING
        except Exception as error:  # Any failure to answer means not serving.
            status = health_pb2.HealthCheckResponse.NOT_SERVING
            problem = type(error).__name__
        self._up.set(1 if status == health_pb2.HealthCheckResponse.SERVING else 0)
        if status != self._last_status:  # Log the changes, not every ping.
            self._last_status = status
            if status == health_pb2.HealthCheckResponse.SERVING:
                log.info("health: SERVING, MongoDB answers")
            else:
                log.warning("health: NOT_SERVING, MongoDB does not answer a ping (%s)", problem)
        for service in self._service_names:
            await self._health.set(service, status)
        if status == health_pb2.HealthCheckResponse.SERVING and not self._indexes_checked:
            self._indexes_checked = True  # once, when MongoDB first answers, however it ends
            await asyncio.get_running_loop().run_in_executor(self._thread, self._check_indexes)
        self.first_check_done.set()

    async def _run(self):
        while True:
            await self.check()
            await asyncio.sleep(self._interval_s)


def _first_line(error, limit=300):
    """An error's message in one short line: the driver's own words, without
    the reply document pymongo appends (", full error: {...}")."""
    text = str(error).split(", full error:", 1)[0]
    text = text.splitlines()[0] if text else type(error).__name__
    return text[:limit] + ("..." if len(text) > limit else "")


class _JsonFormatter(logging.Formatter):
    """One JSON object per line, for log pipelines."""

    def format(self, record):
        entry = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


class _RedactingFormatter(logging.Formatter):
    """Wraps a formatter and blanks out secrets wherever they appear,
    tracebacks included, and in their JSON-escaped spelling too."""

    def __init__(self, inner, secrets):
        super().__init__()
        self._inner = inner
        self._spellings = {form for s in secrets for form in (s, json.dumps(s, ensure_ascii=False)[1:-1])}

    def format(self, record):
        return redact(self._inner.format(record), self._spellings)


def configure_logging(config, stream=None):
    """Text (default) or JSON lines on stderr, never showing a secret."""
    inner = (_JsonFormatter() if config.log_format == "json"
             else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(_RedactingFormatter(inner, config.secrets))
    logging.basicConfig(level=config.log_level, handlers=[handler], force=True)
