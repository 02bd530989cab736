"""Benchmark of the image service: deletes per second, latency, database commands.

    python3 bench_image_service.py                    # in memory, 2 ms added per database command
    python3 bench_image_service.py --mongo-uri URI    # a real MongoDB (use a scratch database)
    python3 bench_image_service.py --serving          # the server itself, against a no-op servicer

It starts the server in-process on a free loopback port, seeds N models of K
images each, shaped as the upload service writes them, and measures:

- the plain four-command sequence (find, delete files, delete chunks, delete
  metadata) run directly against the database, one model at a time: the floor
  a single delete can be compared with;
- the service's own deletion function, run the same way;
- single DeleteImageByModelId calls, at concurrency 1 and C;
- DeleteImagesByModelIds batches of B models;
- with --serving: the server alone, in a child process of its own with the
  production settings (GRPC_MAX_WORKERS, GRPC_MAX_CONCURRENT_RPCS): single
  deletes at concurrency 1, 10 and 50 against the same calls to a no-op
  servicer on the same server setup (the gRPC floor), and health Check
  latency while MongoDB hangs and the admission bound is full.

Database commands are counted by the in-memory store's wrapper, or by pymongo
command monitoring on a real server. Progress goes to stderr, a results table
to stdout and the same results as JSON to --json. This is a benchmark, not a
test: nothing here runs in the test suite.
"""

import argparse
import collections
import contextlib
import dataclasses
import json
import multiprocessing
import statistics
import sys
import threading
import time
from concurrent import futures

import grpc
import pymongo
from pymongo import monitoring

from grpc_health.v1 import health_pb2, health_pb2_grpc

import image_service_pb2 as pb2
import image_service_pb2_grpc as pb2_grpc
import image_service_server as server


class CommandCounter(monitoring.CommandListener):
    """Counts data commands (not handshakes or pings) sent by pymongo."""

    IGNORED = {"hello", "ismaster", "isMaster", "ping", "endSessions", "saslStart", "saslContinue"}

    def __init__(self):
        self.count = 0
        self._lock = threading.Lock()

    def started(self, event):
        if event.command_name not in self.IGNORED:
            with self._lock:
                self.count += 1

    def succeeded(self, event):
        pass

    def failed(self, event):
        pass


class _SlowCollection:
    """A mongomock collection whose every command costs ``latency_s`` and is counted."""

    def __init__(self, collection, latency_s, counter):
        self._collection, self._latency_s, self._counter = collection, latency_s, counter

    def _command(self, method):
        def call(*args, **kwargs):
            with self._counter._lock:
                self._counter.count += 1
            time.sleep(self._latency_s)
            return method(*args, **kwargs)
        return call

    def __getattr__(self, name):
        attribute = getattr(self._collection, name)
        return self._command(attribute) if name in ("find", "delete_many") else attribute


class SlowDatabase:
    """A mongomock database standing in for one across a network."""

    def __init__(self, db, latency_s, counter):
        self._db, self._latency_s, self._counter = db, latency_s, counter
        self.client = db.client
        self.name = db.name

    def __getitem__(self, name):
        return _SlowCollection(self._db[name], self._latency_s, self._counter)

    def __getattr__(self, name):
        return self[name]


def open_database(args):
    """The database under test and its command counter."""
    counter = CommandCounter()
    if args.mongo_uri:
        client = pymongo.MongoClient(args.mongo_uri, event_listeners=[counter])
        return client[args.database], counter
    import mongomock

    return SlowDatabase(mongomock.MongoClient()[args.database], args.latency_ms / 1000, counter), counter


def seed(db, prefix, models, images, image_bytes):
    model_ids = [f"{prefix}-{i}" for i in range(models)]
    for model_id in model_ids:
        for _ in range(images):
            server.store_image(db, model_id, image_bytes)
    return model_ids


def plain_sequence(db, model_id):
    """The plain find / delete files / delete chunks / delete metadata sequence."""
    documents = list(db.images.find({"model_id": model_id}, {"image_id": 1}))
    file_ids = [server.referenced_file_id(d["image_id"]) for d in documents]
    db["fs.files"].delete_many({"_id": {"$in": file_ids}})
    db["fs.chunks"].delete_many({"files_id": {"$in": file_ids}})
    db.images.delete_many({"_id": {"$in": [d["_id"] for d in documents]}})


@dataclasses.dataclass
class Result:
    scenario: str
    models: int
    seconds: float
    latencies_ms: list
    commands: int

    @staticmethod
    def combine(results):
        return Result(results[0].scenario, sum(r.models for r in results), sum(r.seconds for r in results),
                      [latency for r in results for latency in r.latencies_ms], sum(r.commands for r in results))

    def row(self):
        latencies = sorted(self.latencies_ms)
        p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
        return {
            "scenario": self.scenario,
            "models": self.models,
            "models_per_s": round(self.models / self.seconds, 1),
            "call_p50_ms": round(statistics.median(latencies), 2),
            "call_p99_ms": round(p99, 2),
            "commands_per_model": round(self.commands / self.models, 2),
        }


def measure(name, calls, concurrency, models_per_call, counter):
    """Runs ``calls`` (functions of no arguments) at ``concurrency``, timing each."""
    start_count, started = counter.count, time.perf_counter()

    def timed(call):
        begin = time.perf_counter()
        call()
        return (time.perf_counter() - begin) * 1000

    with futures.ThreadPoolExecutor(concurrency) as pool:
        latencies = list(pool.map(timed, calls))
    seconds = time.perf_counter() - started
    print(f"  {name}: {len(calls)} calls, {seconds:.2f} s", file=sys.stderr, flush=True)
    return Result(name, len(calls) * models_per_call, seconds, latencies, counter.count - start_count)


def check_single(reply, kind="delete"):
    expected = pb2.OUTCOME_DELETED if kind == "delete" else pb2.OUTCOME_NOTHING_TO_DELETE
    if not reply.success or reply.outcome != expected:
        raise RuntimeError(f"delete failed: {reply}")


def run(args):
    db, counter = open_database(args)
    config = dataclasses.replace(server.load_config({}), grpc_host="127.0.0.1", grpc_port=0,
                                 max_workers=max(args.concurrency, 4), mongo_timeout_s=60)
    running = server.BackgroundServer(config, db)
    image = bytes(args.image_kib * 1024)
    results = []
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = pb2_grpc.ImageServiceStub(channel)

            def single(model_id):
                return lambda: check_single(stub.DeleteImageByModelId(
                    pb2.DeleteImageRequest(model_id=model_id), timeout=60))

            def batch(model_ids):
                def call():
                    for reply in stub.DeleteImagesByModelIds(
                            pb2.DeleteImagesRequest(model_ids=model_ids), timeout=60).results:
                        check_single(reply)
                return call

            scenarios = [
                ("plain 4-command sequence, direct", 1, 1,
                 lambda ids: [lambda m=m: plain_sequence(db, m) for m in ids]),
                ("service deletion, direct", 1, 1,
                 lambda ids: [lambda m=m: server.delete_images_of_models(db, [m]) for m in ids]),
                ("DeleteImageByModelId, concurrency 1", 1, 1, lambda ids: [single(m) for m in ids]),
                (f"DeleteImageByModelId, concurrency {args.concurrency}", args.concurrency, 1,
                 lambda ids: [single(m) for m in ids]),
                (f"DeleteImagesByModelIds, batches of {args.batch}", 1, args.batch,
                 lambda ids: [batch(ids[i:i + args.batch]) for i in range(0, len(ids), args.batch)]),
            ]
            # Scenarios take turns, round after round, each on freshly seeded
            # models, so that drift in the machine or the store hits all alike.
            per_round = args.models // args.rounds
            for round_number in range(args.rounds):
                print(f"round {round_number + 1}/{args.rounds}: {len(scenarios)} scenarios x {per_round} models"
                      f" x {args.images} images", file=sys.stderr, flush=True)
                for number, (name, concurrency, per_call, make_calls) in enumerate(scenarios):
                    model_ids = seed(db, f"bench{round_number}-{number}", per_round, args.images, image)
                    results.append(measure(name, make_calls(model_ids), concurrency, per_call, counter))
    finally:
        running.stop(0)
    return [Result.combine([r for r in results if r.scenario == name]).row() for name, *_ in scenarios]


def comparisons(rows, batch):
    """The targets: the service's deletion against the plain sequence (same
    store, no gRPC), gRPC's own cost, and a batch against as many single calls."""
    plain, direct, single, _, batched = (row["call_p50_ms"] for row in rows)
    return {
        "service_deletion_p50_over_plain_sequence_p50": round(direct / plain, 2),
        "grpc_single_call_p50_minus_plain_sequence_p50_ms": round(single - plain, 2),
        f"time_of_{batch}_single_calls_over_one_batch_of_{batch}": round(batch * single / batched, 1),
    }


def print_table(rows, extra, out=sys.stdout):
    columns = ["scenario", "models", "models_per_s", "call_p50_ms", "call_p99_ms", "commands_per_model"]
    widths = [max(len(c), *(len(str(r[c])) for r in rows)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)), file=out)
    for row in rows:
        print("  ".join(str(row[c]).ljust(w) for c, w in zip(columns, widths)), file=out)
    for name, value in extra.items():
        print(f"{name}: {value}", file=out)


# ---------------------------------------------------------------------------
# --serving: the server on its own, against the gRPC floor
# ---------------------------------------------------------------------------


class NoOpServicer(pb2_grpc.ImageServiceServicer):
    """Answers at once and touches nothing: what a call costs in gRPC alone."""

    async def DeleteImageByModelId(self, request, context):
        return pb2.DeleteImageResponse(success=True, outcome=pb2.OUTCOME_NOTHING_TO_DELETE,
                                       model_id=request.model_id)


def _child_server(connection, kind, latency_ms, max_concurrent_rpcs, database):
    """Runs in the child: serves, seeds models when asked, stops when told."""
    import mongomock

    db = SlowDatabase(mongomock.MongoClient()[database], latency_ms / 1000, CommandCounter())
    config = dataclasses.replace(server.load_config({}), grpc_host="127.0.0.1", grpc_port=0,
                                 mongo_timeout_s=60, max_concurrent_rpcs=max_concurrent_rpcs)
    running = server.BackgroundServer(config, db, NoOpServicer() if kind == "no-op" else None)
    connection.send(running.port)
    while (message := connection.recv())[0] == "seed":
        _, prefix, models, images, image_kib = message
        connection.send(seed(db, prefix, models, images, bytes(image_kib * 1024)))
    running.stop(0)


@contextlib.contextmanager
def child_server(kind, latency_ms, max_concurrent_rpcs=100, database="ImageServiceBench"):
    """A server in a process of its own (so the load generator does not
    share its interpreter); yields the pipe to it and a stub."""
    # Spawned, not forked: a forked child would inherit this process's gRPC
    # threads and state, which gRPC does not support.
    context = multiprocessing.get_context("spawn")
    parent_end, child_end = context.Pipe()
    process = context.Process(
        target=_child_server, args=(child_end, kind, latency_ms, max_concurrent_rpcs, database), daemon=True)
    process.start()
    port = parent_end.recv()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield parent_end, pb2_grpc.ImageServiceStub(channel), channel
    finally:
        process.kill()
        process.join()


def rate_and_latency(calls, concurrency):
    """Runs the calls at ``concurrency``; calls/s, p50 and p99 in ms."""
    def timed(call):
        begin = time.perf_counter()
        call()
        return (time.perf_counter() - begin) * 1000

    started = time.perf_counter()
    with futures.ThreadPoolExecutor(concurrency) as pool:
        latencies = sorted(pool.map(timed, calls))
    seconds = time.perf_counter() - started
    return len(calls) / seconds, statistics.median(latencies), latencies[int(len(latencies) * 0.99)]


def serving_rows(args):
    """Deletes and no-op calls at concurrency 1, 10 and 50, per store latency."""
    rows = []
    for latency_ms in (0.0, args.latency_ms):
        for kind in ("no-op", "delete"):
            with child_server(kind, latency_ms) as (pipe, stub, _):
                for concurrency in (1, 10, 50):
                    rates, p50s, p99s = [], [], []
                    for round_number in range(args.rounds):
                        pipe.send(("seed", f"s{concurrency}-{round_number}", args.serving_calls // args.rounds,
                                   args.images if kind == "delete" else 0, args.image_kib))
                        model_ids = pipe.recv()
                        rate, p50, p99 = rate_and_latency([
                            lambda m=m, kind=kind: check_single(stub.DeleteImageByModelId(
                                pb2.DeleteImageRequest(model_id=m), timeout=60), kind)
                            for m in model_ids], concurrency)
                        rates.append(rate), p50s.append(p50), p99s.append(p99)
                    row = {"store": f"in memory +{latency_ms:g} ms", "servicer": kind, "concurrency": concurrency,
                           "calls_per_s": round(statistics.median(rates), 1),
                           "p50_ms": round(statistics.median(p50s), 2), "p99_ms": round(statistics.median(p99s), 2)}
                    rows.append(row)
                    print(f"  {row}", file=sys.stderr, flush=True)
    return rows


def serving_ratios(rows):
    """Deletes/s over no-op calls/s, per store latency and concurrency."""
    rate = {(r["store"], r["servicer"], r["concurrency"]): r["calls_per_s"] for r in rows}
    return {f"{store}, concurrency {c}: deletes/s over no-op calls/s": round(rate[store, "delete", c] / noop, 3)
            for (store, kind, c), noop in rate.items() if kind == "no-op" and c > 1}


def health_under_saturation(checks=200, bound=20):
    """Health Check latency while MongoDB hangs and ``bound`` deletes fill
    the admission bound."""
    with child_server("delete", latency_ms=3_600_000, max_concurrent_rpcs=bound) as (_, stub, channel):
        hung = [stub.DeleteImageByModelId.future(pb2.DeleteImageRequest(model_id=f"m{i}"), timeout=120)
                for i in range(bound)]
        while True:  # Until one more delete is shed: the bound is full.
            try:
                stub.DeleteImageByModelId(pb2.DeleteImageRequest(model_id="one-more"), timeout=0.5)
            except grpc.RpcError as error:
                if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    break
        check = health_pb2_grpc.HealthStub(channel).Check
        latencies, refused = [], collections.Counter()
        for _ in range(checks):
            begin = time.perf_counter()
            try:
                check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                latencies.append((time.perf_counter() - begin) * 1000)
            except grpc.RpcError as error:
                refused[error.code().name] += 1
        for call in hung:
            call.cancel()
    latencies.sort()
    answered = {"p50_ms": round(statistics.median(latencies), 2),
                "p99_ms": round(latencies[int(len(latencies) * 0.99)], 2)} if latencies else {}
    return {"checks": checks, "answered": len(latencies), "refused": dict(refused), **answered}


def parse_arguments(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mongo-uri", help="a real MongoDB (default: in memory, with --latency-ms per command)")
    parser.add_argument("--database", default="ImageServiceBench", help="database to seed and empty")
    parser.add_argument("--latency-ms", type=float, default=2.0, help="added to each in-memory database command")
    parser.add_argument("--models", type=int, default=400, help="models per scenario (N), over all rounds")
    parser.add_argument("--rounds", type=int, default=10, help="rounds the models are split into")
    parser.add_argument("--images", type=int, default=3, help="images per model (K)")
    parser.add_argument("--image-kib", type=int, default=16, help="size of each image")
    parser.add_argument("--concurrency", type=int, default=8, help="concurrent single calls (C)")
    parser.add_argument("--batch", type=int, default=40, help="models per batch call (B)")
    parser.add_argument("--json", default="bench-results.json", help="where to write the results")
    parser.add_argument("--serving", action="store_true",
                        help="measure the server itself instead: deletes against a no-op servicer, and health")
    parser.add_argument("--serving-calls", type=int, default=1500, help="calls per serving scenario")
    return parser.parse_args(argv)


def print_serving(rows, ratios, health, out=sys.stdout):
    columns = ["store", "servicer", "concurrency", "calls_per_s", "p50_ms", "p99_ms"]
    widths = [max(len(c), *(len(str(r[c])) for r in rows)) for c in columns]
    for row in [dict(zip(columns, columns)), *rows]:
        print("  ".join(str(row[c]).ljust(w) for c, w in zip(columns, widths)), file=out)
    for name, value in ratios.items():
        print(f"{name}: {value}", file=out)
    print(f"health Check while MongoDB hangs and the admission bound is full: {health}", file=out)


def main(argv=None):
    args = parse_arguments(argv)
    if args.serving:
        rows = serving_rows(args)
        ratios, health = serving_ratios(rows), health_under_saturation()
        print_serving(rows, ratios, health)
        with open(args.json, "w") as file:
            json.dump({"settings": vars(args), "serving": rows, "ratios": ratios, "health": health}, file, indent=2)
        return
    rows = run(args)
    extra = comparisons(rows, args.batch)
    print_table(rows, extra)
    settings = {k: v for k, v in vars(args).items() if k != "mongo_uri"}
    settings["store"] = "real MongoDB" if args.mongo_uri else f"in memory, +{args.latency_ms} ms per command"
    with open(args.json, "w") as file:
        json.dump({"settings": settings, "results": rows, "comparisons": extra}, file, indent=2)
    print(f"results written to {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
