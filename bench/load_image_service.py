"""Load test of the image service: thousands of deletes at concurrency 32.

    python3 -m bench.load_image_service   # in-process server, in memory
    python3 -m bench.load_image_service --calls 20000 --max-seconds 300

It starts the server in-process on a loopback port over an in-memory store,
seeds models shaped like real uploads, and sends DeleteImageByModelId calls
(a mix of models with images, models already emptied and unknown ids) from
``--concurrency`` threads until ``--calls`` are done or ``--max-seconds``
have passed, whichever comes first. It reports every status and outcome, the
errors (anything but a success or load shedding's RESOURCE_EXHAUSTED), and
how the process's resident memory grew after a warm-up. Exit code 1 when
there were errors. Traffic goes to 127.0.0.1 only.
"""

import argparse
import collections
import dataclasses
import itertools
import sys
import threading
import time

import grpc
import mongomock

import image_service_pb2 as pb2
import image_service_pb2_grpc as pb2_grpc
import image_service_server as server
from image_service_background import BackgroundServer
from image_service_settings import load_config
from image_service_store import InMemoryDatabase, create_indexes, store_image


def resident_kib():
    """This process's resident memory, in KiB (Linux)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


@dataclasses.dataclass
class LoadReport:
    calls: int
    seconds: float
    results: collections.Counter  # "OK OUTCOME_DELETED", "RESOURCE_EXHAUSTED", ...
    rss_after_warm_up_kib: int
    rss_at_end_kib: int

    @property
    def errors(self):
        allowed = {"OK OUTCOME_DELETED", "OK OUTCOME_NOTHING_TO_DELETE", "RESOURCE_EXHAUSTED"}
        return sum(count for result, count in self.results.items() if result not in allowed)

    @property
    def rss_growth_kib(self):
        return self.rss_at_end_kib - self.rss_after_warm_up_kib


def run_load(address, model_ids, calls, concurrency, max_seconds, warm_up_calls):
    """Sends ``calls`` deletes (fewer if ``max_seconds`` runs out) from
    ``concurrency`` threads, cycling through ``model_ids``."""
    results = collections.Counter()
    lock = threading.Lock()
    numbers = itertools.count()
    warmed_up = threading.Event()
    rss = {}
    deadline = time.monotonic() + max_seconds

    def worker(stub):
        while time.monotonic() < deadline:
            number = next(numbers)
            if number >= calls:
                return
            if number == warm_up_calls:
                rss["after_warm_up"] = resident_kib()
                warmed_up.set()
            request = pb2.DeleteImageRequest(model_id=model_ids[number % len(model_ids)])
            try:
                reply = stub.DeleteImageByModelId(request, timeout=10)
                result = f"OK {pb2.Outcome.Name(reply.outcome)}"
            except grpc.RpcError as error:
                result = error.code().name
            with lock:
                results[result] += 1

    started = time.monotonic()
    with grpc.insecure_channel(address) as channel:
        stub = pb2_grpc.ImageServiceStub(channel)
        threads = [threading.Thread(target=worker, args=(stub,)) for _ in range(concurrency)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    seconds = time.monotonic() - started
    after_warm_up = rss.get("after_warm_up", resident_kib())
    return LoadReport(sum(results.values()), seconds, results, after_warm_up, resident_kib())


def start_in_memory(models, images, max_concurrent_rpcs):
    """A server on 127.0.0.1 over an in-memory store holding ``models``
    models of ``images`` images each; returns it and the model ids to call."""
    db = mongomock.MongoClient()["CatalogServiceDB"]
    create_indexes(db)  # as a well-kept database has them
    model_ids = [f"load-model-{i}" for i in range(models)]
    for model_id in model_ids:
        for _ in range(images):
            store_image(db, model_id, bytes(4096))
    config = dataclasses.replace(load_config({}), grpc_host="127.0.0.1", grpc_port=0,
                                 max_concurrent_rpcs=max_concurrent_rpcs)
    # Half the calls go to models that never had images.
    unknown = [f"unknown-{i}" for i in range(models)]
    return BackgroundServer(server.start_server(config, InMemoryDatabase(db))), model_ids + unknown


def print_report(report, out=sys.stdout):
    print(f"{report.calls} calls in {report.seconds:.1f} s ({report.calls / report.seconds:.0f}/s)", file=out)
    for result, count in sorted(report.results.items()):
        print(f"  {count:>8}  {result}", file=out)
    print(f"errors (other than shedding): {report.errors}", file=out)
    print(f"resident memory: {report.rss_after_warm_up_kib} KiB after warm-up, {report.rss_at_end_kib} KiB"
          f" at the end ({report.rss_growth_kib:+d} KiB)", file=out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-seconds", type=float, default=120)
    parser.add_argument("--models", type=int, default=500, help="models seeded with images")
    parser.add_argument("--images", type=int, default=2, help="images per seeded model")
    parser.add_argument("--max-concurrent-rpcs", type=int, default=100,
                        help="the server's GRPC_MAX_CONCURRENT_RPCS")
    args = parser.parse_args(argv)
    running, model_ids = start_in_memory(args.models, args.images, args.max_concurrent_rpcs)
    try:
        report = run_load(f"127.0.0.1:{running.port}", model_ids, args.calls, args.concurrency,
                          args.max_seconds, warm_up_calls=args.calls // 10)
    finally:
        running.stop(0)
    print_report(report)
    return 1 if report.errors else 0


if __name__ == "__main__":
    sys.exit(main())
