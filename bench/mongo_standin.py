"""A MongoDB stand-in for the benchmark: the wire protocol, nothing stored.

It answers the real driver over TCP (through ``bench/mongo_wire.py``) at
once, or after a fixed added latency per command, so that what a benchmark
measures is each gRPC server's own work and not a database's. Every model
asked for has one image, until it is deleted: the only thing the stand-in
remembers is which images were (so that a read after the delete, or one
leaving out what it deletes, finds none left). No other model references
its file; every other ``delete`` removes as many documents as ids it names.
It runs on one asyncio event loop in a process of its own
(``standin_process``), so its CPU is never counted as a server's.

    python3 -m bench.mongo_standin --port 27099 --db-latency-ms 1
"""

import argparse
import asyncio
import contextlib
import hashlib
import multiprocessing

from bson import Int64, ObjectId

from bench import mongo_wire

# Sessions offered, as a real server offers them: the driver's work per
# command is then as in production.
HELLO = {**mongo_wire.HELLO, "logicalSessionTimeoutMinutes": 30}

# What the service's index check looks for, and the upload service's lookup by image.
INDEXES = {
    "images": [{"v": 2, "key": {"_id": 1}, "name": "_id_"},
               {"v": 2, "key": {"model_id": 1}, "name": "model_id_1"},
               {"v": 2, "key": {"image_id": 1}, "name": "image_id_1"}],
    "fs.chunks": [{"v": 2, "key": {"_id": 1}, "name": "_id_"},
                  {"v": 2, "key": {"files_id": 1, "n": 1}, "name": "files_id_1_n_1", "unique": True}],
}

DELETED_IMAGES = set()


def image_of(model_id):
    """The one image of a model, the same at every read."""
    digest = hashlib.blake2b(model_id.encode(), digest_size=24).digest()
    return {"_id": ObjectId(digest[:12]), "image_id": digest[12:].hex(), "model_id": model_id}


def images_of(query):
    """The images a read by ``model_id`` (equal, or ``$in``) finds, but
    those of ``_id`` in a ``$nin``."""
    wanted = query.get("model_id")
    model_ids = wanted.get("$in", []) if isinstance(wanted, dict) else [wanted]
    excluded = set(query.get("_id", {}).get("$nin", []))  # the read that goes with a delete
    images = [image_of(model_id) for model_id in model_ids if isinstance(model_id, str)]
    return [image for image in images if image["_id"] not in DELETED_IMAGES | excluded]


def remember_deleted_images(command):
    for statement in command["deletes"]:
        condition = statement["q"].get("_id")
        DELETED_IMAGES.update(condition["$in"] if isinstance(condition, dict) else [condition])


def deleted_count(command):
    """How many documents a delete removes: one per id of an ``$in``, else one."""
    removed = 0
    for statement in command["deletes"]:
        condition = next(iter(statement["q"].values()), None)
        removed += len(condition["$in"]) if isinstance(condition, dict) and "$in" in condition else 1
    return removed


def answer(command, _size):
    """The reply to one command, as the stand-in's whole database (its size
    in bytes does not matter here)."""
    name = next(iter(command))
    if name.lower() in ("ismaster", "hello"):
        return HELLO
    if name == "listCollections":  # the collection asked for, with no default collation
        collection = {"name": command["filter"]["name"], "type": "collection", "options": {}}
        return mongo_wire.cursor(f"{command.get('$db', 'admin')}.$cmd.listCollections", [collection])
    namespace = f"{command.get('$db', 'admin')}.{command[name]}"
    if name == "find":
        found = images_of(command.get("filter", {})) if command[name] == "images" else []
        return mongo_wire.cursor(namespace, found)
    if name == "aggregate":  # other models' references to a file: none
        return mongo_wire.cursor(namespace, [])
    if name == "delete":
        if command[name] == "images":
            remember_deleted_images(command)
        return {"n": deleted_count(command), "ok": 1}
    if name == "getMore":
        return {"cursor": {"id": Int64(0), "ns": namespace, "nextBatch": []}, "ok": 1}
    if name == "listIndexes":
        return mongo_wire.cursor(namespace, INDEXES.get(command[name], INDEXES["fs.chunks"][:1]))
    if name == "buildInfo":
        return {"version": "7.0.0", "versionArray": [7, 0, 0, 0], "ok": 1}
    return {"ok": 1}  # ping, endSessions, and anything else


def _run_standin(ready, latency_s):
    asyncio.run(mongo_wire.serve(answer, 0, latency_s, on_listening=ready.send))


@contextlib.contextmanager
def standin_process(latency_ms=0.0):
    """The stand-in in a spawned process of its own; yields its pid and a
    ``mongodb://`` URI for it."""
    context = multiprocessing.get_context("spawn")
    parent_end, child_end = context.Pipe()
    process = context.Process(target=_run_standin, args=(child_end, latency_ms / 1000), daemon=True)
    process.start()
    try:
        port = parent_end.recv()
        yield process.pid, f"mongodb://127.0.0.1:{port}/?directConnection=true"
    finally:
        process.kill()
        process.join()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=27099, help="port to listen on, on 127.0.0.1")
    parser.add_argument("--db-latency-ms", type=float, default=0.0, help="added to every command's answer")
    args = parser.parse_args(argv)
    asyncio.run(mongo_wire.serve(answer, args.port, args.db_latency_ms / 1000))


if __name__ == "__main__":
    main()
