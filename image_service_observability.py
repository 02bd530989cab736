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
import os
import re
import socket
import socketserver
import sys
import threading
import wsgiref.simple_server

import prometheus_client
import pymongo
import pymongo.monitoring
import pythonjsonlogger.json
from grpc_health.v1 import health_pb2

import image_service_pb2 as pb2
from image_service_settings import host_in_uri, redact
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


class _MetricsHTTPServer(socketserver.ThreadingMixIn, wsgiref.simple_server.WSGIServer):
    daemon_threads = True


class _QuietHandler(wsgiref.simple_server.WSGIRequestHandler):
    def log_message(self, format, *args):  # no line per scrape on stderr
        pass


def start_metrics_endpoint(host, port, registry):
    """Serves ``registry`` at ``/metrics`` (and nowhere else: 404) on a
    thread of its own; returns the HTTP server (``server_port``, ``shutdown``)."""
    metrics_app = prometheus_client.make_wsgi_app(registry)

    def app(environ, start_response):
        if environ.get("PATH_INFO") == "/metrics":
            return metrics_app(environ, start_response)
        start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
        return [b"not found; the metrics are at /metrics\n"]

    family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                   flags=socket.AI_PASSIVE)[0]
    server_class = type("MetricsHTTPServer", (_MetricsHTTPServer,), {"address_family": family})
    httpd = wsgiref.simple_server.make_server(address[0], address[1], app, server_class, _QuietHandler)
    threading.Thread(target=httpd.serve_forever, name="metrics-http", daemon=True).start()
    return httpd


class CommandTimer(pymongo.monitoring.CommandListener):
    """Feeds the driver's own command monitoring into a histogram by command name."""

    def __init__(self, histogram):
        self._histogram = histogram

    def started(self, event):
        pass

    def succeeded(self, event):
        self._histogram.labels(event.command_name).observe(event.duration_micros / 1e6)

    failed = succeeded


_SERVER_AT_START = re.compile(r"(?:^|,)(\[[0-9A-Fa-f:.%]+\]:\d+|[A-Za-z0-9_.-]+:\d+): ")
SERVERS_NAMED = 3  # in one failure's line
REASON_LIMIT = 120  # characters per server's reason


def _short_reason(text):
    """A driver's reason, bounded, as a phrase: "connection refused". An
    operating-system error is named as the system names it, whichever words
    the driver wrapped it in ("Connect call failed (...)", say)."""
    system_error = re.search(r"\[Errno (\d+)\]", text)
    if system_error:
        text = os.strerror(int(system_error[1]))
    text = re.sub(r"\[Errno -?\d+\] ", "", text).strip(" ,")
    if re.match(r"[A-Z][a-z]", text):
        text = text[0].lower() + text[1:]
    return text[:REASON_LIMIT] + ("..." if len(text) > REASON_LIMIT else "")


def describe_failure(error):
    """A MongoDB driver failure in one short line: each server it tried and
    why, as in ``db1:27017: connection refused; db2:27017: timed out``.
    Never the driver's topology dump or its configured timeouts, and never
    credentials (driver messages name hosts, not users). For the health log
    and a failed delete's warning; the full text belongs at DEBUG at most."""
    full = str(error)
    text = re.split(r", (?:Timeout: |Topology Description: |full error: )", full, maxsplit=1)[0]
    text = re.sub(r"\s*\(configured timeouts:[^)]*\)", "", text)
    text = text.splitlines()[0] if text.strip() else type(error).__name__
    starts = list(_SERVER_AT_START.finditer(text))
    if not starts:  # no server named its own reason, as in "No primary available for writes"
        tried = [f"{host_in_uri(host)}:{port}"
                 for host, port in re.findall(r"<ServerDescription \('([^']*)', (\d+)\)", full)]
        more = f" (tried {', '.join(tried[:SERVERS_NAMED])}{', ...' if len(tried) > SERVERS_NAMED else ''})"
        return _short_reason(text) + (more if tried else "")
    ends = [start.start() for start in starts[1:]] + [len(text)]
    servers = [f"{start[1]}: {_short_reason(text[start.end():end])}"
               for start, end in zip(starts, ends, strict=True)]
    if len(servers) > SERVERS_NAMED:
        servers[SERVERS_NAMED:] = [f"...(+{len(servers) - SERVERS_NAMED} more)"]
    return "; ".join(servers)


class MongoHealthMonitor:
    """Keeps the standard health service in step with MongoDB: SERVING while
    a ping answers within the timeout, NOT_SERVING while it does not. Pings
    are awaited on the event loop, like deletes, and never wait behind them.

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
        self._task = None
        self._last_status = None

    def start(self):
        self._task = asyncio.ensure_future(self._run())

    def stop(self):
        if self._task:
            self._task.cancel()

    async def _ping(self):
        with pymongo.timeout(self._timeout_s):
            await self._db.client.admin.command("ping")

    async def _check_indexes(self):
        """Warns about missing indexes; any failure to look is one warning."""
        try:
            with pymongo.timeout(self._index_check_timeout_s):
                await warn_about_missing_indexes(self._db)
        except Exception as error:  # Not health's business: deletes work without the check.
            hint = " (the check needs the listIndexes action)" if getattr(error, "code", None) == 13 else ""
            log.warning("could not check the indexes: %s: %s; serving regardless%s", type(error).__name__,
                        _first_line(error), hint)

    async def check(self):
        """Pings MongoDB once and publishes the result."""
        try:
            await self._ping()
            status = health_pb2.HealthCheckResponse.SERVING
        except Exception as error:  # Any failure to answer means not serving.
            status = health_pb2.HealthCheckResponse.NOT_SERVING
            failure = error
        self._up.set(1 if status == health_pb2.HealthCheckResponse.SERVING else 0)
        if status != self._last_status:  # Log the changes, not every ping.
            self._last_status = status
            if status == health_pb2.HealthCheckResponse.SERVING:
                log.info("health: SERVING, MongoDB answers")
            else:
                log.warning("health: NOT_SERVING, MongoDB does not answer a ping: %s",
                            describe_failure(failure))
                log.debug("health: the ping failed: %s: %s", type(failure).__name__, failure)
        for service in self._service_names:
            await self._health.set(service, status)
        if status == health_pb2.HealthCheckResponse.SERVING and not self._indexes_checked:
            self._indexes_checked = True  # once, when MongoDB first answers, however it ends
            await self._check_indexes()
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


def json_formatter():
    """One JSON object per line, for log pipelines: ``time`` (ISO 8601, UTC),
    ``level``, ``logger``, ``message``, and each structured field a line
    was logged with (``extra=``; a call's request id, status, outcome...)
    as a key of its own."""
    return pythonjsonlogger.json.JsonFormatter(
        "{levelname}{name}{message}", style="{", timestamp="time", json_ensure_ascii=False,
        rename_fields={"levelname": "level", "name": "logger", "exc_info": "exception"})


class _TextFormatter(logging.Formatter):
    """Today's text line; a call traced adds its ``trace_id`` at the end."""

    def __init__(self):
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record):
        line = super().format(record)
        trace_id = getattr(record, "trace_id", None)
        return f"{line} trace_id={trace_id}" if trace_id else line


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
    """Text (default) or JSON lines on stderr, never showing a secret; LOG_LEVEL
    for the service's loggers, at most INFO's detail for the libraries'."""
    inner = json_formatter() if config.log_format == "json" else _TextFormatter()
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(_RedactingFormatter(inner, config.secrets))
    # Only the service's own loggers follow LOG_LEVEL down to DEBUG: the
    # driver's (every command, every server selection), gRPC's and asyncio's
    # DEBUG lines would bury them.
    level = logging.getLevelName(config.log_level)
    logging.basicConfig(level=max(level, logging.INFO), handlers=[handler], force=True)
    logging.getLogger("image_service").setLevel(level)
