"""Benchmark of the image service: deletes per second, latency, database commands.

    python3 -m bench.bench_image_service                  # in memory, 2 ms added per database command
    python3 -m bench.bench_image_service --mongo-uri URI  # a real MongoDB (use a scratch database)
    python3 -m bench.bench_image_service --serving        # the server itself, against a no-op servicer
    python3 -m bench.bench_image_service --compare        # side by side with the original, over TCP
    python3 -m bench.bench_image_service --health         # health Check while MongoDB hangs, admission full

It starts the server in-process on a free loopback port, seeds N models of K
images each, shaped as the upload service writes them, and measures:

- the plain four-command sequence (find, delete files, delete chunks, delete
  metadata) run directly against the database, one model at a time: the floor
  a single delete can be compared with;
- the service's own deletion function, run the same way;
- single DeleteImageByModelId calls, at concurrency 1 and C;
- DeleteImagesByModelIds batches of B models;
- with --serving: the server alone, in a child process of its own with the
  production settings (MAX_CONCURRENT_DELETIONS, GRPC_MAX_CONCURRENT_RPCS): single
  deletes at concurrency 1, 10 and 50 against the same calls to a no-op
  servicer on the same server setup (the gRPC floor), and health Check
  latency while MongoDB hangs and the admission bound is full.

With --compare, no store is in memory: a no-op synchronous server, the
original algorithm (a synchronous server with 10 threads: find_one, then
GridFS delete, then delete_one) and this service (wired as main() wires it,
default settings) each run in a process of their own against
bench/mongo_standin.py, a MongoDB wire-protocol responder that stores
nothing, with --db-latency-ms added per command. A load generator in another
process deletes a distinct 1-image model per call, at each --callers count;
one table per latency gives deletes/s, p50, p99 and the server process's CPU
per delete (from /proc), median and range of --repeat runs, and this
service's ratios to the original. --candidate NAME=PATH adds a modified copy
of image_service_server.py as a row, to measure a change before making it.

Database commands are counted by the in-memory store's wrapper, or by pymongo
command monitoring on a real server. Progress goes to stderr, a results table
to stdout and the same results as JSON to --json. This is a benchmark, not a
test: nothing here runs in the test suite.
"""

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import importlib.util
import json
import multiprocessing
import os
import statistics
import sys
import threading
import time
from concurrent import futures

import gridfs
import grpc
import pymongo
import uvloop
from bson import ObjectId
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pymongo import monitoring

import image_service_pb2 as pb2
import image_service_pb2_grpc as pb2_grpc
import image_service_server as server
from bench.mongo_standin import standin_process
from image_service_background import BackgroundServer
from image_service_replies import RequestedModels
from image_service_store import InMemoryDatabase, referenced_file_id, store_image


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
    """The in-memory stand-in's collection, every command of which costs
    ``latency_s`` (awaited, as a network round trip is) and is counted."""

    def __init__(self, collection, latency_s, counter):
        self._collection, self._latency_s, self._counter = collection, latency_s, counter

    async def _arrive(self):
        with self._counter._lock:
            self._counter.count += 1
        await asyncio.sleep(self._latency_s)

    def find(self, *args, **kwargs):
        return _SlowCursor(self._arrive(), self._collection.find(*args, **kwargs))

    async def aggregate(self, *args, **kwargs):
        await self._arrive()
        return await self._collection.aggregate(*args, **kwargs)

    async def delete_many(self, *args, **kwargs):
        await self._arrive()
        return await self._collection.delete_many(*args, **kwargs)

    async def index_information(self):
        return await self._collection.index_information()


class _SlowCursor:
    def __init__(self, arrival, cursor):
        self._arrival, self._cursor = arrival, cursor

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self._arrival is not None:
            arrival, self._arrival = self._arrival, None
            await arrival
        return await self._cursor.__anext__()


class SlowDatabase:
    """The in-memory stand-in (mongomock) as if across a network: ``sync``
    is the mongomock database itself, for seeding."""

    def __init__(self, db, latency_s, counter):
        self.sync = db
        self._db, self._latency_s, self._counter = InMemoryDatabase(db), latency_s, counter
        self.client = self._db.client
        self.name = db.name

    def __getitem__(self, name):
        return _SlowCollection(self._db[name], self._latency_s, self._counter)

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        return self[name]

    async def list_collections(self, **kwargs):
        return await self._db.list_collections(**kwargs)


def open_database(args):
    """The database under test, its command counter, and a synchronous
    handle on it for seeding."""
    counter = CommandCounter()
    if args.mongo_uri:
        client = pymongo.AsyncMongoClient(args.mongo_uri, event_listeners=[counter])
        return client[args.database], counter, pymongo.MongoClient(args.mongo_uri)[args.database]
    import mongomock

    db = SlowDatabase(mongomock.MongoClient()[args.database], args.latency_ms / 1000, counter)
    return db, counter, db.sync


def seed(db, prefix, models, images, image_bytes):
    """Models stored as the upload service stores them, through a
    synchronous handle on the database (``SlowDatabase.sync``, say)."""
    model_ids = [f"{prefix}-{i}" for i in range(models)]
    for model_id in model_ids:
        for _ in range(images):
            store_image(db, model_id, image_bytes)
    return model_ids


async def direct_delete(db, model_id):
    """The service's deletion of one model, without gRPC."""
    return await server.delete_and_describe(db, RequestedModels([model_id]), time.monotonic() + 60)


async def plain_sequence(db, model_id):
    """The plain find / delete files / delete chunks / delete metadata sequence."""
    documents = [document async for document in db.images.find({"model_id": model_id}, {"image_id": 1})]
    file_ids = [referenced_file_id(d["image_id"]) for d in documents]
    await db["fs.files"].delete_many({"_id": {"$in": file_ids}})
    await db["fs.chunks"].delete_many({"files_id": {"$in": file_ids}})
    await db.images.delete_many({"_id": {"$in": [d["_id"] for d in documents]}})


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
                      [latency for r in results for latency in r.latencies_ms],
                      sum(r.commands for r in results))

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
    db, counter, sync_db = open_database(args)
    config = dataclasses.replace(server.load_config({}), grpc_host="127.0.0.1", grpc_port=0,
                                 max_concurrent_deletions=max(args.concurrency, 4), mongo_timeout_s=60)
    running = BackgroundServer(server.start_server(config, db))
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
                 lambda ids: [lambda m=m: asyncio.run(plain_sequence(db, m)) for m in ids]),
                ("service deletion, direct", 1, 1,
                 lambda ids: [lambda m=m: asyncio.run(direct_delete(db, m)) for m in ids]),
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
                print(f"round {round_number + 1}/{args.rounds}: {len(scenarios)} scenarios"
                      f" x {per_round} models x {args.images} images", file=sys.stderr, flush=True)
                for number, (name, concurrency, per_call, make_calls) in enumerate(scenarios):
                    model_ids = seed(sync_db, f"bench{round_number}-{number}", per_round, args.images, image)
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
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)), file=out)
    for row in rows:
        print("  ".join(str(row[c]).ljust(w) for c, w in zip(columns, widths, strict=True)), file=out)
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
    running = BackgroundServer(server.start_server(config, db, NoOpServicer() if kind == "no-op" else None))
    connection.send(running.port)
    while (message := connection.recv())[0] == "seed":
        _, prefix, models, images, image_kib = message
        connection.send(seed(db.sync, prefix, models, images, bytes(image_kib * 1024)))
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
    child_end.close()  # the child's alone now: its exit ends our reads
    port = received(parent_end, "the server")
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
                        pipe.send(("seed", f"s{concurrency}-{round_number}",
                                   args.serving_calls // args.rounds,
                                   args.images if kind == "delete" else 0, args.image_kib))
                        model_ids = pipe.recv()
                        rate, p50, p99 = rate_and_latency([
                            lambda m=m, kind=kind: check_single(stub.DeleteImageByModelId(
                                pb2.DeleteImageRequest(model_id=m), timeout=60), kind)
                            for m in model_ids], concurrency)
                        rates.append(rate), p50s.append(p50), p99s.append(p99)
                    row = {"store": f"in memory +{latency_ms:g} ms", "servicer": kind,
                           "concurrency": concurrency, "calls_per_s": round(statistics.median(rates), 1),
                           "p50_ms": round(statistics.median(p50s), 2),
                           "p99_ms": round(statistics.median(p99s), 2)}
                    rows.append(row)
                    print(f"  {row}", file=sys.stderr, flush=True)
    return rows


def serving_ratios(rows):
    """Deletes/s over no-op calls/s, per store latency and concurrency."""
    rate = {(r["store"], r["servicer"], r["concurrency"]): r["calls_per_s"] for r in rows}
    return {f"{store}, concurrency {c}: deletes/s over no-op calls/s":
            round(rate[store, "delete", c] / noop, 3)
            for (store, kind, c), noop in rate.items() if kind == "no-op" and c > 1}


def health_under_saturation(checks=200, bound=20):
    """Health Check latency while MongoDB hangs and ``bound`` deletes fill
    the admission bound."""
    with child_server("delete", latency_ms=3_600_000, max_concurrent_rpcs=bound) as (_, stub, channel):
        hung = [stub.DeleteImageByModelId.future(pb2.DeleteImageRequest(model_id=f"m{i}"), timeout=120)
                for i in range(bound)]
        for _ in range(100):  # Until one more delete is shed: the bound is full.
            try:
                stub.DeleteImageByModelId(pb2.DeleteImageRequest(model_id="one-more"), timeout=0.5)
            except grpc.RpcError as error:
                if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    break
            # A hung delete shed because the probe raced ahead of it: send it again.
            hung = [call if not call.done() else stub.DeleteImageByModelId.future(
                pb2.DeleteImageRequest(model_id=f"m{i}"), timeout=120) for i, call in enumerate(hung)]
        else:
            raise RuntimeError("the admission bound never filled up: 100 probes were not shed")
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


# ---------------------------------------------------------------------------
# --compare: this service against the original algorithm and a no-op, over
# TCP, against the wire-protocol stand-in (bench/mongo_standin.py)
# ---------------------------------------------------------------------------


class SyncNoOpServicer(pb2_grpc.ImageServiceServicer):
    """Answers success at once: what a call costs a synchronous gRPC server."""

    def DeleteImageByModelId(self, request, context):
        return pb2.DeleteImageResponse(success=True)


class OriginalServicer(pb2_grpc.ImageServiceServicer):
    """The original algorithm, as the seed describes it: one image found,
    its GridFS file deleted, then its metadata."""

    def __init__(self, db):
        self._db = db

    def DeleteImageByModelId(self, request, context):
        document = self._db.images.find_one({"model_id": request.model_id})
        gridfs.GridFS(self._db).delete(ObjectId(document["image_id"]))
        self._db.images.delete_one({"_id": document["_id"]})
        return pb2.DeleteImageResponse(success=True)


def _serve_sync(ready, uri, kind):
    """A synchronous gRPC server with 10 threads, the original's setup."""
    if kind == "no-op":
        servicer = SyncNoOpServicer()
    else:
        servicer = OriginalServicer(pymongo.MongoClient(uri).CatalogServiceDB)
    grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=10))
    pb2_grpc.add_ImageServiceServicer_to_server(servicer, grpc_server)
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    grpc_server.start()
    ready.send(port)
    grpc_server.wait_for_termination()


def _service_module(path):
    """image_service_server, or a candidate version of it read from ``path``."""
    if path is None:
        return server
    spec = importlib.util.spec_from_file_location("image_service_server", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _serve_service(ready, uri, path):
    """The service as main() wires it, default settings, log lines to /dev/null."""
    service = _service_module(path)
    config = service.load_config({"MONGO_URI": uri, "GRPC_HOST": "127.0.0.1", "GRPC_PORT": "0"})
    metrics = service.Metrics()
    db, _ = service.open_database(config, False, [service.CommandTimer(metrics.mongodb_command_duration)])
    service.configure_logging(config, stream=open(os.devnull, "w"))  # open as long as the process

    async def serve_until_killed():
        running = await service.start_server(config, db, metrics=metrics)
        ready.send(running.port)
        await asyncio.Event().wait()

    uvloop.run(serve_until_killed())  # as main() runs it


@contextlib.contextmanager
def spawned(target, *args):
    """``target(pipe_end, *args)`` in a spawned process; yields its pid and
    the first thing it sends."""
    context = multiprocessing.get_context("spawn")
    parent_end, child_end = context.Pipe()
    process = context.Process(target=target, args=(child_end, *args), daemon=True)
    process.start()
    child_end.close()  # the child's alone now: its exit ends our reads
    try:
        yield process.pid, received(parent_end, target.__name__), parent_end
    finally:
        process.kill()
        process.join()


def received(pipe, sender):
    """The next thing ``sender`` sends on ``pipe``; a clear error, not a
    wait forever, when its process has ended (its traceback is above)."""
    try:
        return pipe.recv()
    except EOFError:
        raise RuntimeError(f"{sender} ended without answering; its error is above") from None


def cpu_seconds(pid):
    """A process's user and system CPU time so far, all threads."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / ticks, int(fields[12]) / ticks


def _call_all(stub, model_ids, callers):
    """Deletes each model id once, ``callers`` at a time; sorted latencies
    (ms). Each caller starts its next call from the completion callback of
    its last: no thread per caller, so the load generator spends little CPU."""
    remaining, lock, finished = iter(model_ids), threading.Lock(), threading.Semaphore(0)
    latencies, failures = [], []

    def call_next():
        with lock:
            model_id = next(remaining, None)
        if model_id is None:
            finished.release()
            return
        begin = time.perf_counter()
        call = stub.DeleteImageByModelId.future(pb2.DeleteImageRequest(model_id=model_id), timeout=60)
        call.add_done_callback(lambda done: record(done, begin))

    def record(done, begin):
        latencies.append((time.perf_counter() - begin) * 1000)
        if done.exception() is not None or not done.result().success:
            failures.append(done.exception() or done.result())
        call_next()

    for _ in range(callers):
        call_next()
    for _ in range(callers):
        finished.acquire()
    if failures:
        raise RuntimeError(f"{len(failures)} deletes failed, the first: {failures[0]}")
    return sorted(latencies)


def _generate_load(ready, _):
    """The load generator's process: runs each (port, callers, prefix,
    calls) it is sent and answers with seconds, latencies and its own CPU."""
    ready.send("ready")
    stubs = {}
    while (task := ready.recv()) is not None:
        port, callers, prefix, calls = task
        if port not in stubs:
            stubs[port] = pb2_grpc.ImageServiceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        model_ids = [f"{prefix}-{i}" for i in range(calls)]
        cpu_started, started = time.process_time(), time.perf_counter()
        latencies = _call_all(stubs[port], model_ids, callers)
        ready.send((time.perf_counter() - started, latencies, time.process_time() - cpu_started))


def measure_cell(load, servers, kind, callers, calls, tag):
    """One cell: ``calls`` deletes of distinct 1-image models to one server
    at ``callers`` concurrent callers, after a warm-up, with the CPU each
    process spent on them."""
    server_pid, port = servers["pids"][kind], servers["ports"][kind]
    load.send((port, callers, f"warm-{tag}", max(200, callers * 4)))
    received(load, "the load generator")
    server_cpu, standin_cpu = cpu_seconds(server_pid), cpu_seconds(servers["standin"])
    load.send((port, callers, tag, calls))
    seconds, latencies, client_cpu = received(load, "the load generator")
    server_user, server_system = (
        after - before for after, before in zip(cpu_seconds(server_pid), server_cpu, strict=True))
    standin_used = sum(cpu_seconds(servers["standin"])) - sum(standin_cpu)
    return {"deletes_per_s": calls / seconds, "p50_ms": latencies[len(latencies) // 2],
            "p99_ms": latencies[int(len(latencies) * 0.99)],
            "server_cpu_us": (server_user + server_system) / calls * 1e6,
            "server_sys_us": server_system / calls * 1e6,
            "client_cpu_us": client_cpu / calls * 1e6, "standin_cpu_us": standin_used / calls * 1e6}


def server_kinds(args):
    """Each server compared: its name, its process's target and arguments."""
    kinds = {"no-op": (_serve_sync, "no-op"), "original": (_serve_sync, "original"),
             "this service": (_serve_service, None)}
    for candidate in args.candidate:
        name, _, path = candidate.partition("=")
        kinds[name] = (_serve_service, os.path.abspath(path))
    return kinds


def compare_at_latency(args, latency_ms):
    """Every cell at one database latency: the servers take turns, cell by
    cell and repeat by repeat, so that drift in the machine hits all alike."""
    cells = collections.defaultdict(list)
    with contextlib.ExitStack() as stack:
        standin_pid, uri = stack.enter_context(standin_process(latency_ms))
        servers = {"standin": standin_pid, "pids": {}, "ports": {}}
        for kind, (target, argument) in server_kinds(args).items():
            pid, port, _ = stack.enter_context(spawned(target, uri, argument))
            servers["pids"][kind], servers["ports"][kind] = pid, port
        _, _, load = stack.enter_context(spawned(_generate_load, None))
        for repeat in range(args.repeat):
            for callers in args.callers:
                for kind in servers["pids"]:
                    # Each server deletes models of its own: the stand-in remembers deletions.
                    tag = f"{kind}-{latency_ms}-{repeat}-{callers}"
                    cell = measure_cell(load, servers, kind, callers, args.calls, tag)
                    cells[kind, callers].append(cell)
                    print(f"  +{latency_ms:g} ms, repeat {repeat + 1}, {callers} callers, {kind}: "
                          + ", ".join(f"{k} {v:.1f}" for k, v in cell.items()), file=sys.stderr, flush=True)
        load.send(None)
    return cells


def summarize(values):
    """Median and range of one figure over the repeats."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def comparison_rows(cells):
    """One row per server, per figure and caller count: median and range."""
    rows = collections.defaultdict(dict)
    for (kind, callers), repeats in cells.items():
        for figure in repeats[0]:
            rows[kind][f"{figure}@{callers}"] = summarize([cell[figure] for cell in repeats])
    return rows


def _shown_figure(summary, digits):
    return f"{summary['median']:.{digits}f} ({summary['min']:.{digits}f}-{summary['max']:.{digits}f})"


TABLE_FIGURES = (("deletes_per_s", "del/s", 0), ("p50_ms", "p50 ms", 2), ("p99_ms", "p99 ms", 2),
                 ("server_cpu_us", "CPU us/del", 0))


def _ratio(rows, kind, figure):
    return rows[kind][figure]["median"] / rows["original"][figure]["median"]


def print_comparison(latency_ms, rows, callers, out=sys.stdout):
    """The side-by-side table at one database latency, and this service's
    ratios to the original."""
    columns = [(f"{figure}@{c}", f"{title} @{c}", digits)
               for c in callers for figure, title, digits in TABLE_FIGURES]
    table = [["server", *(title for _, title, _ in columns)]]
    table += [[kind, *(_shown_figure(row[key], digits) for key, _, digits in columns)]
              for kind, row in rows.items()]
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    print(f"\n+{latency_ms:g} ms per database command (median (min-max) of the repeats)", file=out)
    for line in table:
        print("  ".join(text.ljust(width) for text, width in zip(line, widths, strict=True)), file=out)
    for kind in rows:
        if kind not in ("no-op", "original"):
            ratios = ", ".join(f"{c} callers: del/s {_ratio(rows, kind, f'deletes_per_s@{c}'):.2f}x,"
                               f" CPU/del {_ratio(rows, kind, f'server_cpu_us@{c}'):.2f}x" for c in callers)
            print(f"{kind} / original: {ratios}", file=out)
    helpers = ", ".join(f"{kind} client {row[f'client_cpu_us@{c}']['median']:.0f} / stand-in "
                        f"{row[f'standin_cpu_us@{c}']['median']:.0f}"
                        for kind, row in rows.items() for c in callers[:1])
    print(f"load generator and stand-in CPU us per delete at {callers[0]} callers: {helpers}", file=out)


def compare(args):
    results = {}
    for latency_ms in args.db_latency_ms:
        rows = comparison_rows(compare_at_latency(args, latency_ms))
        results[f"+{latency_ms:g} ms"] = rows
        print_comparison(latency_ms, rows, args.callers)
    return results


def parse_arguments(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mongo-uri",
                        help="a real MongoDB (default: in memory, with --latency-ms per command)")
    parser.add_argument("--database", default="ImageServiceBench", help="database to seed and empty")
    parser.add_argument("--latency-ms", type=float, default=2.0,
                        help="added to each in-memory database command")
    parser.add_argument("--models", type=int, default=400, help="models per scenario (N), over all rounds")
    parser.add_argument("--rounds", type=int, default=10, help="rounds the models are split into")
    parser.add_argument("--images", type=int, default=3, help="images per model (K)")
    parser.add_argument("--image-kib", type=int, default=16, help="size of each image")
    parser.add_argument("--concurrency", type=int, default=8, help="concurrent single calls (C)")
    parser.add_argument("--batch", type=int, default=40, help="models per batch call (B)")
    parser.add_argument("--json", default="bench-results.json", help="where to write the results")
    parser.add_argument("--serving", action="store_true",
                        help="measure the server itself instead: deletes against a no-op servicer,"
                             " and health")
    parser.add_argument("--serving-calls", type=int, default=1500, help="calls per serving scenario")
    parser.add_argument("--health", action="store_true",
                        help="measure only health Check latency while MongoDB hangs and admission is full")
    parser.add_argument("--compare", action="store_true",
                        help="no-op, the original algorithm and this service side by side, each in a"
                             " process of its own, against a MongoDB wire-protocol stand-in storing nothing")
    parser.add_argument("--db-latency-ms", type=float, nargs="+", default=[0.0, 1.0],
                        help="with --compare: the stand-in's added latency per command, one table each")
    parser.add_argument("--calls", type=int, default=2000, help="with --compare: deletes per cell")
    parser.add_argument("--repeat", type=int, default=3, help="with --compare: repeats of every cell")
    parser.add_argument("--callers", type=int, nargs="+", default=[10, 50],
                        help="with --compare: concurrent callers, one column group each")
    parser.add_argument("--candidate", action="append", default=[], metavar="NAME=PATH",
                        help="with --compare: one more row, the service as a modified copy of"
                             " image_service_server.py at PATH would serve")
    return parser.parse_args(argv)


def print_serving(rows, ratios, health, out=sys.stdout):
    columns = ["store", "servicer", "concurrency", "calls_per_s", "p50_ms", "p99_ms"]
    widths = [max(len(c), *(len(str(r[c])) for r in rows)) for c in columns]
    for row in [dict(zip(columns, columns, strict=True)), *rows]:
        print("  ".join(str(row[c]).ljust(w) for c, w in zip(columns, widths, strict=True)), file=out)
    for name, value in ratios.items():
        print(f"{name}: {value}", file=out)
    print(f"health Check while MongoDB hangs and the admission bound is full: {health}", file=out)


def main(argv=None):
    args = parse_arguments(argv)
    if args.compare:
        results = compare(args)
        with open(args.json, "w") as file:
            json.dump({"settings": vars(args), "compare": results}, file, indent=2)
        return
    if args.health:
        health = health_under_saturation()
        print(f"health Check while MongoDB hangs and the admission bound is full: {health}")
        return
    if args.serving:
        rows = serving_rows(args)
        ratios, health = serving_ratios(rows), health_under_saturation()
        print_serving(rows, ratios, health)
        with open(args.json, "w") as file:
            json.dump({"settings": vars(args), "serving": rows, "ratios": ratios, "health": health},
                      file, indent=2)
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
