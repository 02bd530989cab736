"""The service with tracing on, as a candidate of the benchmark's side by side:

    .venv/bin/python -m bench.bench_image_service --compare --candidate "traced=bench/traced_service.py"

It is ``image_service_server`` with OpenTelemetry tracing turned on as an
operator would turn it on (an OTLP endpoint, the SDK's batching, the span
per call and per MongoDB command), exporting to a sink: an OTLP/gRPC
receiver in a process of its own that answers every export and keeps
nothing, so the server process's CPU is the price of tracing, export
included. Needs requirements-tracing.txt. Run directly, it is that
receiver: it prints its port and ends when its standard input closes.
"""

import os
import subprocess
import sys
from concurrent import futures

import image_service_server as server
from image_service_server import CommandTimer, Metrics, configure_logging, load_config
from image_service_tracing import start_tracing

CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

__all__ = ["CommandTimer", "Metrics", "configure_logging", "load_config", "open_database", "start_server"]


def run_sink():
    """An OTLP/gRPC trace receiver on loopback that keeps nothing."""
    import grpc
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

    class Sink(trace_service_pb2_grpc.TraceServiceServicer):
        def Export(self, request, context):
            return trace_service_pb2.ExportTraceServiceResponse()

    receiver = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Sink(), receiver)
    port = receiver.add_insecure_port("127.0.0.1:0")
    receiver.start()
    print(port, flush=True)
    sys.stdin.read()  # until the server process that started it is gone
    receiver.stop(None)


def _start_sink():
    """The sink in a process of its own; its port."""
    sink = subprocess.Popen([sys.executable, "-m", "bench.traced_service"], cwd=CHECKOUT,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    return int(sink.stdout.readline())


def _tracing():
    port = _start_sink()
    return start_tracing({"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
                                 "OTEL_EXPORTER_OTLP_INSECURE": "true"})


def open_database(config, in_memory, event_listeners=(), serving=True):
    return server.open_database(config, in_memory, [*event_listeners, *TRACING.command_listeners], serving)


async def start_server(config, db, servicer=None, metrics=None):
    return await server.start_server(config, db, servicer, metrics, TRACING)


if __name__ == "__main__":
    run_sink()
else:  # a candidate of the benchmark
    TRACING = _tracing()
