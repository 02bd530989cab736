"""Tracing: opt-in OpenTelemetry spans for the calls and their MongoDB commands.

This module owns when tracing is on (the standard ``OTEL_*`` variables), the
tracer provider and its OTLP exporter, a server span per ImageService call
continuing the caller's W3C ``traceparent`` (OpenTelemetry's own gRPC
instrumentation, its grpc.aio server interceptor), a child span per MongoDB
command (its pymongo instrumentation's command listener, given to the
client like any other), and what a call's span and its log line say of each
other: the request id and outcome on the span, the trace id on the line.

OpenTelemetry is imported only when tracing is on. Off, the service runs
without the packages (``requirements-tracing.txt``), and nothing is added
around a call or a command.
"""

import os

from image_service_settings import ConfigError

SERVICE_NAME = "image-service"
TRACED_SERVICE = "image_service.ImageService"  # health and reflection probes get no spans
OTLP_ENDPOINTS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
OTLP_PROTOCOLS = ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL")
INSTALL_HINT = ".venv/bin/pip install -r requirements-tracing.txt"


def _setting(env, name):
    return (env.get(name) or "").strip().lower()


def tracing_wanted(env):
    """On when OTEL_TRACES_EXPORTER is ``otlp``, or when an OTLP endpoint is
    set and OTEL_TRACES_EXPORTER is not ``none``; OTEL_SDK_DISABLED=true
    turns it off whatever else is set. Any other exporter is refused by
    name: only OTLP is built in."""
    if _setting(env, "OTEL_SDK_DISABLED") == "true":
        return False
    exporter = _setting(env, "OTEL_TRACES_EXPORTER")
    if exporter not in ("", "otlp", "none"):
        raise ConfigError(f"OTEL_TRACES_EXPORTER must be otlp or none (OTLP is the exporter built in),"
                          f" got {exporter!r}")
    if exporter == "none":
        return False
    return exporter == "otlp" or any(env.get(name) for name in OTLP_ENDPOINTS)


def _check_protocol(env):
    """OTLP over gRPC is the exporter installed; another protocol is refused by name."""
    for name in OTLP_PROTOCOLS:
        protocol = _setting(env, name)
        if protocol and protocol != "grpc":
            raise ConfigError(f"{name} must be grpc (the OTLP exporter installed), got {protocol!r}")
        if protocol:
            return


class TracingOff:
    """Tracing off: nothing around calls, no command listener, nothing to flush."""

    interceptors = ()
    command_listeners = ()
    call_observer = None

    def shutdown(self):
        pass


class Tracing:
    """Tracing on, through ``provider``: the server interceptor (outermost),
    the command listener for the MongoDB client, and the observer of each
    call's end (before its log line is written)."""

    def __init__(self, provider):
        from opentelemetry import trace
        from opentelemetry.instrumentation.grpc import aio_server_interceptor, filters

        self._provider = provider
        self._current_span = trace.get_current_span
        self.interceptors = (aio_server_interceptor(provider, filters.service_name(TRACED_SERVICE)),)
        self.command_listeners = (_commands_of_calls(trace.get_tracer(__name__, tracer_provider=provider)),)
        self.call_observer = self.observe_call

    def observe_call(self, call, status):
        """Puts the call's request id and outcome on its span, and the
        span's trace id among the fields of the call's log line."""
        span = self._current_span()
        if not span.is_recording():  # a probe, or a call sampled out
            return
        call.fields["trace_id"] = format(span.get_span_context().trace_id, "032x")
        span.set_attribute("image_service.request_id", call.request_id)
        span.set_attribute("image_service.status", status)
        for name in ("outcome", "deleted_images", "deleted_files", "dry_run", "models"):
            if name in call.fields:
                span.set_attribute(f"image_service.{name}", call.fields[name])
        if "outcomes" in call.fields:
            span.set_attribute("image_service.outcomes", sorted(call.fields["outcomes"]))

    def shutdown(self):
        """Sends the spans still waiting in the batch, then stops."""
        self._provider.shutdown()


def _commands_of_calls(tracer):
    """The pymongo instrumentation's command listener, for the commands a
    call sends: a health ping or the index check belongs to no call, and
    would be a trace of its own every few seconds. Statements stay out of
    the spans (the instrumentation's default): they hold model and file ids."""
    from opentelemetry import trace
    from opentelemetry.instrumentation.pymongo import CommandTracer

    class CommandsOfCalls(CommandTracer):
        def started(self, event):
            if trace.get_current_span().is_recording():
                super().started(event)

    return CommandsOfCalls(tracer)


def start_tracing(env):
    """Tracing as the OTEL_* settings ask (see ``tracing_wanted``), or
    ``TracingOff()``. The exporter, the batching and the sampler read their
    own standard variables (OTEL_EXPORTER_OTLP_*, OTEL_BSP_*,
    OTEL_TRACES_SAMPLER); those set in ``.env`` are exported for them."""
    if not tracing_wanted(env):
        return TracingOff()
    _check_protocol(env)
    for name, value in env.items():
        if name.startswith("OTEL_") and value is not None:
            os.environ.setdefault(name, value)
    try:
        return Tracing(_otlp_provider(env.get("OTEL_SERVICE_NAME") or SERVICE_NAME))
    except ImportError:
        raise ConfigError(f"OTEL_*: tracing is on, but the OpenTelemetry packages are not installed:"
                          f" {INSTALL_HINT}") from None


def _otlp_provider(service):
    """A tracer provider sending batches of spans over OTLP/gRPC."""
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return provider
