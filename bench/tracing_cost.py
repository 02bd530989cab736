"""What a delete costs the server process in CPU, with tracing off and on.

    .venv/bin/python -m bench.tracing_cost
    .venv/bin/python -m bench.tracing_cost --also before=/path/to/an/earlier/checkout

Each variant is ``image_service_server.py --in-memory`` in a process of its
own, started as an operator starts it: "off" with no OTEL_* setting, "on"
with an OTLP endpoint (a sink process that answers every export and keeps
nothing, bench/traced_service.py), and with ``--also``, another checkout's
server, off. Each round sends every variant, in turn, a warm-up and then
``--calls`` deletes of models that have no images (one read each) from
``--callers`` threads, and reads the server process's CPU time from /proc
before and after. Variants take turns round by round, so that drift in the
machine hits all alike; the median and range over the rounds are printed.
In memory, MongoDB commands send no monitoring events, so "on" measures the
call's span, its attributes and its export; the span per command is in the
side-by-side run (bench/traced_service.py). Traffic stays on 127.0.0.1.
"""

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from concurrent import futures

import grpc

import image_service_pb2 as pb2
import image_service_pb2_grpc as pb2_grpc

CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETTING_PREFIXES = ("OTEL_", "GRPC_", "LOG_")  # a developer's own, left out


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def cpu_seconds(pid):
    """A process's user and system CPU time so far, all threads."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_sink():
    """The OTLP sink in a process of its own; the process and its port."""
    sink = subprocess.Popen([sys.executable, "-m", "bench.traced_service"], cwd=CHECKOUT,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    return sink, int(sink.stdout.readline())


def measure(checkout, settings, calls, callers, round_number, workdir):
    """CPU microseconds per delete of one server process, over ``calls`` deletes after a warm-up."""
    port = free_port()
    env = {name: value for name, value in os.environ.items() if not name.startswith(SETTING_PREFIXES)}
    env.update(GRPC_HOST="127.0.0.1", GRPC_PORT=str(port), **settings)
    argv = [sys.executable, os.path.join(checkout, "image_service_server.py"), "--in-memory"]
    server = subprocess.Popen(argv, cwd=workdir, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            grpc.channel_ready_future(channel).result(timeout=30)
            stub = pb2_grpc.ImageServiceStub(channel)

            def delete(number):
                request = pb2.DeleteImageRequest(model_id=f"none-{round_number}-{number}")
                stub.DeleteImageByModelId(request, timeout=30)

            with futures.ThreadPoolExecutor(callers) as pool:
                list(pool.map(delete, range(-200, 0)))  # warm-up
                before = cpu_seconds(server.pid)
                list(pool.map(delete, range(calls)))
                after = cpu_seconds(server.pid)
    finally:
        server.terminate()
        server.wait(30)
    return (after - before) / calls * 1e6


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--callers", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--also", action="append", default=[], metavar="NAME=CHECKOUT",
                        help="another checkout's server, tracing off, as one more variant")
    args = parser.parse_args(argv)
    sink, sink_port = start_sink()
    variants = {"off": (CHECKOUT, {}),
                "on": (CHECKOUT, {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{sink_port}",
                              "OTEL_EXPORTER_OTLP_INSECURE": "true"})}
    for also in args.also:
        name, _, checkout = also.partition("=")
        variants[name] = (os.path.abspath(checkout), {})
    figures = {name: [] for name in variants}
    try:
        with tempfile.TemporaryDirectory() as workdir:  # no .env of a developer's
            for round_number in range(args.rounds):
                for name, (checkout, settings) in variants.items():
                    figure = measure(checkout, settings, args.calls, args.callers, round_number, workdir)
                    figures[name].append(figure)
                    print(f"  round {round_number + 1}, {name}: {figure:.0f} us CPU per delete",
                          file=sys.stderr, flush=True)
    finally:
        sink.stdin.close()
        sink.wait(30)
    print(f"server CPU per delete, {args.calls} deletes at {args.callers} callers, {args.rounds} rounds"
          " (median, min-max):")
    for name, values in figures.items():
        print(f"  {name:>10}: {statistics.median(values):.0f} us ({min(values):.0f}-{max(values):.0f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
