"""Tracing: off by default and then absent; on, a server span per call that
continues the caller's traceparent, a child span per MongoDB command, the
request id and outcome on the span, the trace id on the log line; and the
spans reach a real OTLP endpoint."""

import os
import subprocess
import sys
import threading
from concurrent import futures

import grpc
import pymongo
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

import image_service_pb2 as pb2
import image_service_tracing as tracing_module
from image_service_settings import ConfigError
from support import HERE, ServerProcess, delete, delete_batch, serving, serving_on, upload

CALLER_TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN_ID = "00f067aa0ba902b7"
TESTS = os.path.dirname(os.path.abspath(__file__))
TRACEPARENT = ("traceparent", f"00-{CALLER_TRACE_ID}-{CALLER_SPAN_ID}-01")


@pytest.fixture
def spans():
    """Tracing into an in-memory exporter; yields (tracing, exporter)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing = tracing_module.Tracing(provider)
    yield tracing, exporter
    tracing.shutdown()


def server_spans(exporter):
    return [span for span in exporter.get_finished_spans() if span.kind == SpanKind.SERVER]


@pytest.mark.parametrize("env", [{}, {"OTEL_SERVICE_NAME": "image-service"},
                                 {"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"},
                                 {"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "otlp"}],
                         ids=["nothing set", "a service name only", "exporter none", "sdk disabled"])
def test_tracing_is_off_unless_an_otlp_exporter_or_endpoint_is_set(env):
    assert not tracing_module.tracing_wanted(env)


@pytest.mark.parametrize("env", [{"OTEL_TRACES_EXPORTER": "otlp"},
                                 {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"},
                                 {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4317"}],
                         ids=["exporter otlp", "an endpoint", "a traces endpoint"])
def test_tracing_is_on_with_the_otlp_exporter_or_an_otlp_endpoint(env):
    assert tracing_module.tracing_wanted(env)


@pytest.mark.parametrize("env, message", [
    ({"OTEL_TRACES_EXPORTER": "zipkin"}, "OTEL_TRACES_EXPORTER must be otlp or none"),
    ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"},
     "OTEL_EXPORTER_OTLP_PROTOCOL must be grpc"),
])
def test_an_exporter_or_protocol_not_built_in_is_refused_naming_the_variable(env, message):
    with pytest.raises(ConfigError, match=message):
        tracing_module.start_tracing(env)


OFF_PROGRAM = """
import sys
import support
import image_service_pb2 as pb2
from image_service_store import open_in_memory_database
with support.serving(open_in_memory_database("CatalogServiceDB")) as (stub, _, _):
    stub.DeleteImageByModelId(pb2.DeleteImageRequest(model_id="sample-chair"), timeout=10,
                              metadata=[("traceparent", "00-%s-%s-01")])
print(sorted(name for name in sys.modules if name.startswith("opentelemetry")))
""" % (CALLER_TRACE_ID, CALLER_SPAN_ID)


def test_with_tracing_off_a_call_makes_no_span_and_opentelemetry_is_never_imported():
    done = subprocess.run([sys.executable, "-c", OFF_PROGRAM], cwd=HERE, capture_output=True, text=True,
                          timeout=30, env={**os.environ, "PYTHONPATH": os.pathsep.join([HERE, TESTS])})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_a_call_gets_a_server_span_whose_parent_is_the_callers_traceparent(database, spans):
    tracing, exporter = spans
    upload(database, "chair")
    with serving(database, tracing=tracing) as (stub, _, _):
        delete(stub, "chair", metadata=[TRACEPARENT, ("x-request-id", "trace-1")])
    (span,) = server_spans(exporter)
    assert span.name == "/image_service.ImageService/DeleteImageByModelId"
    assert format(span.context.trace_id, "032x") == CALLER_TRACE_ID
    assert format(span.parent.span_id, "016x") == CALLER_SPAN_ID and span.parent.is_remote


def test_a_calls_span_carries_its_request_id_and_outcome(database, spans):
    tracing, exporter = spans
    upload(database, "chair")
    with serving(database, tracing=tracing) as (stub, _, _):
        delete(stub, "chair", metadata=[("x-request-id", "trace-2")])
    (span,) = server_spans(exporter)
    assert {name: span.attributes[f"image_service.{name}"] for name in (
        "request_id", "status", "outcome", "deleted_images", "deleted_files", "dry_run")} == {
        "request_id": "trace-2", "status": "OK", "outcome": "OUTCOME_DELETED", "deleted_images": 1,
        "deleted_files": 1, "dry_run": False}


def test_a_batchs_span_carries_its_outcomes(database, spans):
    tracing, exporter = spans
    upload(database, "chair")
    with serving(database, tracing=tracing) as (stub, _, _):
        delete_batch(stub, ["chair", "table"])
    (span,) = server_spans(exporter)
    assert span.attributes["image_service.outcomes"] == ("OUTCOME_DELETED", "OUTCOME_NOTHING_TO_DELETE")
    assert span.attributes["image_service.models"] == 2


def test_a_call_without_a_traceparent_starts_a_trace_of_its_own(database, spans):
    tracing, exporter = spans
    with serving(database, tracing=tracing) as (stub, _, _):
        delete(stub, "chair")
    (span,) = server_spans(exporter)
    assert span.parent is None


def test_health_checks_get_no_span(database, spans):
    tracing, exporter = spans
    with serving(database, tracing=tracing, health_interval_s=0.01) as (_, running, channel):
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert exporter.get_finished_spans() == ()


def test_the_calls_log_line_carries_the_trace_id(database, spans, service_log):
    tracing, exporter = spans
    with serving(database, tracing=tracing) as (stub, _, _):
        delete(stub, "chair", metadata=[TRACEPARENT, ("x-request-id", "trace-3")])
        record = service_log.wait_for("request_id=trace-3")
    assert record.trace_id == CALLER_TRACE_ID


def test_each_mongodb_command_of_a_call_is_a_child_span_of_the_calls_span(wire, spans):
    tracing, exporter = spans
    upload(wire.db, "chair")
    client = pymongo.AsyncMongoClient(wire.uri, event_listeners=list(tracing.command_listeners))
    with serving_on(client, tracing=tracing) as (stub, _, _):
        delete(stub, "chair", metadata=[TRACEPARENT])
    (call_span,) = server_spans(exporter)
    commands = [span for span in exporter.get_finished_spans() if span.kind == SpanKind.CLIENT]
    # The first delete also decides, once per collection, whether commands name a collation.
    assert [span.name for span in commands] == [
        "CatalogServiceDB.listCollections", "CatalogServiceDB.find", "CatalogServiceDB.aggregate",
        "CatalogServiceDB.listCollections", "CatalogServiceDB.delete",
        "CatalogServiceDB.listCollections", "CatalogServiceDB.delete",
        "CatalogServiceDB.delete", "CatalogServiceDB.find"]
    assert {span.parent.span_id for span in commands} == {call_span.context.span_id}
    assert {span.context.trace_id for span in commands} == {call_span.context.trace_id}
    assert all("chair" not in str(dict(span.attributes)) for span in commands)  # no statements


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace receiver on loopback: what a real exporter sends arrives here."""

    def __init__(self):
        self.spans = []
        self.arrived = threading.Event()

    def Export(self, request, context):
        for resource_spans in request.resource_spans:
            resource = {kv.key: kv.value.string_value for kv in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                self.spans.extend((resource, span) for span in scope_spans.spans)
        self.arrived.set()
        return trace_service_pb2.ExportTraceServiceResponse()


@pytest.fixture
def collector():
    receiver = Collector()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield receiver, port
    server.stop(None)


def test_spans_reach_a_real_otlp_endpoint_from_the_server_process(tmp_path, collector):
    receiver, port = collector
    running = ServerProcess(tmp_path, {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
                                       "OTEL_EXPORTER_OTLP_INSECURE": "true"}, "--in-memory")
    running.stub.DeleteImageByModelId(pb2.DeleteImageRequest(model_id="sample-chair"), timeout=10,
                                      metadata=[TRACEPARENT, ("x-request-id", "otlp-1")])
    assert running.stop() == 0  # the drain sends the spans still waiting in the batch
    assert receiver.arrived.wait(10)
    ((resource, span),) = receiver.spans
    assert resource["service.name"] == "image-service"
    assert (span.trace_id.hex(), span.parent_span_id.hex()) == (CALLER_TRACE_ID, CALLER_SPAN_ID)
    attributes = {kv.key: kv.value for kv in span.attributes}
    assert attributes["image_service.request_id"].string_value == "otlp-1"
    assert attributes["image_service.outcome"].string_value == "OUTCOME_DELETED"
    assert f"trace_id={CALLER_TRACE_ID}" in running.log()
