"""The image service's specification, as tests.

Behaviour tests run the server in-process on an ephemeral port, over an
insecure channel, on mongomock, and again on a real MongoDB when
TEST_MONGO_URI is set (skipped, with that reason, when it is not). Failure
paths use the real pymongo driver against real sockets: a closed port, a
socket that never answers, and WireMongo below, a wire-protocol stand-in
whose data lives in mongomock and whose commands can be counted, held,
failed or dropped.
"""

import contextlib
import dataclasses
import datetime
import filecmp
import gc
import io
import json
import logging
import multiprocessing
import os
import queue
import re
import shutil
import signal
import socket
import socketserver
import struct
import subprocess
import sys
import threading
import time
import urllib.request

import bson
import grpc
import mongomock
import pymongo
import pytest
from bson import Int64, ObjectId
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from hypothesis import given, settings, strategies as st
from mockupdb import MockupDB

import image_service_client as client_cli
import image_service_pb2 as pb2
import image_service_pb2_grpc as pb2_grpc
import image_service_server as server

HERE = os.path.dirname(os.path.abspath(__file__))
SERVER_SCRIPT = os.path.join(HERE, "image_service_server.py")
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

# ---------------------------------------------------------------------------
# Data, shaped as the upload service writes it
# ---------------------------------------------------------------------------

IMAGE = bytes(range(256)) * 1200  # 300 KiB: two GridFS chunks


def upload(db, model_id, data=IMAGE):
    """One image stored the way the upload service stores it."""
    return server.store_image(db, model_id, data)


def images_of(db, model_id):
    return list(db.images.find({"model_id": model_id}))


def everything(db):
    """The whole image store, comparable before and after."""
    return {name: sorted(db[name].find(), key=lambda d: str(d["_id"]))
            for name in ("images", "fs.files", "fs.chunks")}


def model_data(db, model_id):
    """A model's metadata, files and chunks, to show it was left untouched."""
    metadata = images_of(db, model_id)
    file_ids = [ObjectId(d["image_id"]) for d in metadata]
    return (metadata, list(db["fs.files"].find({"_id": {"$in": file_ids}})),
            list(db["fs.chunks"].find({"files_id": {"$in": file_ids}})))


def assert_store_consistent(db):
    """No orphan chunks, no unreferenced files, no dangling metadata."""
    file_ids = {f["_id"] for f in db["fs.files"].find()}
    referenced = {server.referenced_file_id(d.get("image_id")) for d in db.images.find()}
    chunk_owners = {c["files_id"] for c in db["fs.chunks"].find()}
    assert chunk_owners <= file_ids, "chunks without a file"
    assert file_ids <= referenced, "files no images document references"
    assert referenced <= file_ids, "images documents whose file is gone"


def test_uploads_in_tests_are_shaped_like_the_upload_service():
    db = mongomock.MongoClient().db
    file_id = upload(db, "chair")
    (metadata,) = images_of(db, "chair")
    assert set(metadata) == {"_id", "name", "image_id", "model_id"}
    assert metadata["image_id"] == str(file_id) and metadata["name"] == "chair.jpg"
    stored = db["fs.files"].find_one({"_id": file_id})
    assert stored["filename"] == "chair.jpg" and stored["length"] == len(IMAGE)
    assert stored["chunkSize"] == 255 * 1024 and isinstance(stored["uploadDate"], datetime.datetime)
    chunks = sorted(db["fs.chunks"].find({"files_id": file_id}), key=lambda c: c["n"])
    assert [c["n"] for c in chunks] == [0, 1]
    assert b"".join(c["data"] for c in chunks) == IMAGE


# ---------------------------------------------------------------------------
# Servers, channels and databases
# ---------------------------------------------------------------------------

TEST_CONFIG = server.Config(
    mongo_uri="mongodb://127.0.0.1:1/", grpc_host="127.0.0.1", grpc_port=0,
    mongo_timeout_s=2.0, health_interval_s=0.1)


@contextlib.contextmanager
def serving(db, metrics=None, **settings_):
    """The service on an ephemeral port, and a stub for it."""
    running = server.BackgroundServer(dataclasses.replace(TEST_CONFIG, **settings_), db, metrics=metrics)
    # mongomock is not safe to use from two threads at once: let the first
    # ping (and index check) pass before the test touches the database.
    running.run(running.running.monitor.first_check_done.wait(), timeout_s=10)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            yield pb2_grpc.ImageServiceStub(channel), running, channel
    finally:
        running.stop(0)


class LogWatcher(logging.Handler):
    """Collects the service's log records and lets a test wait for one: a
    call's line is written as the call ends, which may be just after its
    caller has the reply."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []
        self._arrived = threading.Condition()

    def emit(self, record):
        with self._arrived:
            self.records.append(record)
            self._arrived.notify_all()

    def wait_for(self, text, timeout=10):
        with self._arrived:
            assert self._arrived.wait_for(lambda: any(text in r.getMessage() for r in self.records), timeout), text
            return next(r for r in self.records if text in r.getMessage())


@pytest.fixture
def service_log():
    watcher = LogWatcher()
    server.log.addHandler(watcher)
    previous = server.log.level
    server.log.setLevel(logging.DEBUG)
    yield watcher
    server.log.setLevel(previous)
    server.log.removeHandler(watcher)


@pytest.fixture(params=["mongomock", "real MongoDB"])
def database(request):
    """An empty database: mongomock, and a real MongoDB if TEST_MONGO_URI says where."""
    if request.param == "mongomock":
        yield mongomock.MongoClient()["CatalogServiceDB"]
        return
    uri = os.environ.get("TEST_MONGO_URI")
    if not uri:
        pytest.skip("TEST_MONGO_URI is not set: set it to a MongoDB URI to run this test on a real server")
    client = pymongo.MongoClient(uri, serverSelectionTimeoutMS=5000)
    name = f"image_service_test_{ObjectId()}"
    try:
        yield client[name]
    finally:
        client.drop_database(name)
        client.close()


@pytest.fixture
def stub(database):
    with serving(database) as (stub_, _, _):
        yield stub_


def delete(stub_, model_id, **kwargs):
    return stub_.DeleteImageByModelId(pb2.DeleteImageRequest(model_id=model_id), timeout=10, **kwargs)


def closed_port():
    """A loopback port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def silent_socket():
    """A port that accepts connections and never answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        yield sock.getsockname()[1]


class WireMongo:
    """A MongoDB server at the wire level whose data lives in ``self.db`` (mongomock).

    The real pymongo driver talks to it over a socket. It answers hello, ping,
    find, aggregate, insert and delete; counts the data commands; and can
    fail any of them by number (an error reply, or the connection dropped
    before or after the command took effect), run a hook before one, or stop
    answering until ``recover()``.
    """

    HELLO = {"ismaster": True, "isWritablePrimary": True, "helloOk": True, "minWireVersion": 0,
             "maxWireVersion": 21, "maxBsonObjectSize": 16 * 1024 * 1024,
             "maxMessageSizeBytes": 48_000_000, "maxWriteBatchSize": 100_000}

    def __init__(self, port=None):
        self.db = mongomock.MongoClient()["CatalogServiceDB"]
        self.commands = []  # every data command received, as sent
        self.faults = {}  # command number (from 1) -> "error" | "drop-before" | "drop-after" | callable
        self.answering = threading.Event()
        self.answering.set()
        self.arrivals = threading.Semaphore(0)  # released as each data command arrives
        self._lock = threading.Lock()
        self._mockup = MockupDB(port=port)
        self._mockup.autoresponds(self._handle)
        self.port = self._mockup.run()
        self.uri = f"mongodb://127.0.0.1:{self.port}/?directConnection=true"

    def client(self, timeout_ms=2000):
        return pymongo.MongoClient(self.uri, serverSelectionTimeoutMS=timeout_ms)

    def names(self):
        return [next(iter(command)) for command in self.commands]

    def hang(self):
        self.answering.clear()

    def recover(self):
        self.answering.set()

    def stop(self):
        self.recover()
        # mockupdb's accept loop looks at this flag once a second, or when a
        # connection arrives: one wakes it, so that stopping is immediate.
        self._mockup._stopped = True
        with contextlib.suppress(OSError):
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
        self._mockup.stop()

    def _handle(self, request):
        try:
            return self._respond(request)
        except OSError:  # The client gave up on this connection: nobody to answer.
            return True

    def _respond(self, request):
        name = request.command_name
        if name in ("ismaster", "isMaster", "hello"):
            return request.ok(self.HELLO)
        # mockupdb serves one request at a time under its lock: let go of it
        # so that a held or slow command does not stall every connection.
        with self._mockup._unlock():
            if name in ("endSessions", "killCursors"):
                return request.ok()
            if name == "listIndexes":  # the index check, not a data command
                return request.ok(cursor=self._indexes(request.doc[name]))
            if name != "ping":
                self.arrivals.release()
            while not self.answering.wait(0.05):
                if self._mockup._stopped:
                    return request.hangup()
            if name == "ping":
                return request.ok()
            with self._lock:
                self.commands.append(request.doc)
                fault = self.faults.pop(len(self.commands), None)
            if callable(fault):
                fault()
            if fault == "error":
                return request.command_err(code=2, errmsg="injected failure")
            if fault == "drop-before":
                return request.hangup()
            reply = self._execute(name, request.doc)
            return request.hangup() if fault == "drop-after" else request.ok(reply)

    def _indexes(self, collection):
        indexes = [{"v": 2, "key": dict(index["key"]), "name": name,
                    **({"unique": True} if index.get("unique") else {})}
                   for name, index in self.db[collection].index_information().items()]
        return {"id": Int64(0), "ns": f"{self.db.name}.{collection}", "firstBatch": indexes}

    def _execute(self, name, command):
        collection = self.db[command[name]]
        namespace = f"{self.db.name}.{command[name]}"
        if name == "find":
            documents = list(collection.find(command.get("filter", {}), command.get("projection")))
        elif name == "aggregate":
            documents = list(collection.aggregate(command["pipeline"]))
        elif name == "createIndexes":
            for index in command["indexes"]:
                collection.create_index(list(index["key"].items()), unique=index.get("unique", False))
            return {"numIndexesBefore": 1, "numIndexesAfter": 1 + len(command["indexes"])}
        elif name == "insert":
            return {"n": len(collection.insert_many(command["documents"]).inserted_ids)}
        elif name == "delete":
            removed = 0
            for statement in command["deletes"]:
                remove = collection.delete_many if statement["limit"] == 0 else collection.delete_one
                removed += remove(statement["q"]).deleted_count
            return {"n": removed}
        else:
            raise AssertionError(f"WireMongo does not know {name!r}")
        return {"cursor": {"id": Int64(0), "ns": namespace, "firstBatch": documents}}


class SyntheticMongo(socketserver.ThreadingTCPServer):
    """A MongoDB at the wire level, in a few lines of OP_MSG, holding one
    model with ``images`` images synthesised on demand rather than stored
    (each with one file and one chunk). It answers the handshake, find and
    getMore on ``images`` and deletes by ``$in``, remembering what is gone,
    and records each command's name, collection and size."""

    daemon_threads = True

    def __init__(self, model_id, images):
        super().__init__(("127.0.0.1", 0), _OpMsgHandler)
        self.model_id = model_id
        self.metadata_ids = [ObjectId(b"\x01" + i.to_bytes(11, "big")) for i in range(images)]
        self.file_ids = [ObjectId(b"\x02" + i.to_bytes(11, "big")) for i in range(images)]
        self.present = {"images": set(self.metadata_ids), "fs.files": set(self.file_ids),
                        "fs.chunks": set(self.file_ids)}
        self.commands = []  # (name, collection, size of the command in bytes)
        self._next = 0

    def answer(self, command, size):
        name = next(iter(command))
        if name.lower() in ("ismaster", "hello"):
            return {**WireMongo.HELLO, "ok": 1}
        if name in ("ping", "endSessions"):
            return {"ok": 1}
        if name == "report":  # for the test: what is left, and what was asked
            return {"present": {key: len(ids) for key, ids in self.present.items()},
                    "commands": [list(command) for command in self.commands], "ok": 1}
        self.commands.append((name, str(command[name]), size))
        if name == "find":
            self._next = 0
            return {"cursor": self._batch(command["batchSize"], "firstBatch"), "ok": 1}
        if name == "getMore":
            return {"cursor": self._batch(command["batchSize"], "nextBatch"), "ok": 1}
        if name == "delete":
            ((_, condition),) = command["deletes"][0]["q"].items()
            gone = self.present[command["delete"]] & set(condition["$in"])
            self.present[command["delete"]] -= gone
            return {"n": len(gone), "ok": 1}
        raise AssertionError(f"SyntheticMongo does not know {name!r}")

    def _batch(self, size, key):
        numbers = range(self._next, min(self._next + size, len(self.metadata_ids)))
        self._next = numbers.stop
        # image_id as an ObjectId, as other writers store it: spelling a
        # million ids out as hex would cost this stand-in most of the test.
        documents = [{"_id": self.metadata_ids[i], "model_id": self.model_id, "image_id": self.file_ids[i]}
                     for i in numbers]
        return {"id": Int64(1 if len(numbers) == size else 0), "ns": "CatalogServiceDB.images", key: documents}


def _serve_synthetic(model_id, images, ports):
    stand_in = SyntheticMongo(model_id, images)
    gc.freeze()  # Millions of ids that never die: the collector need not walk them.
    ports.put(stand_in.server_address[1])
    stand_in.serve_forever()


@contextlib.contextmanager
def synthetic_mongo(model_id, images):
    """The URI of a SyntheticMongo running in a process of its own: a
    million documents pass through it and the driver, which in one
    interpreter would take turns on one lock."""
    context = multiprocessing.get_context("spawn")
    ports = context.Queue()
    process = context.Process(target=_serve_synthetic, args=(model_id, images, ports), daemon=True)
    process.start()
    try:
        yield f"mongodb://127.0.0.1:{ports.get(timeout=60)}/?directConnection=true"
    finally:
        process.kill()
        process.join()


class _OpMsgHandler(socketserver.BaseRequestHandler):
    """One connection: OP_QUERY for the legacy handshake, OP_MSG for the rest
    (a body section and, for inserts and deletes, one document sequence)."""

    def handle(self):
        while header := self._read(16):
            length, request_id, _, opcode = struct.unpack("<iiii", header)
            body = self._read(length - 16)
            if opcode == 2004:  # OP_QUERY: flags, collection name, skip, limit, then the command
                command = bson.decode(body[body.index(b"\0", 4) + 9:])
                reply = bson.encode(self.server.answer(command, len(body)))
                message = struct.pack("<iqii", 0, 0, 0, 1) + reply
                opcode_out = 1
            else:
                command = self._op_msg_command(body)
                message = b"\0\0\0\0\0" + bson.encode(self.server.answer(command, len(body)))
                opcode_out = 2013
            self.request.sendall(struct.pack("<iiii", 16 + len(message), 0, request_id, opcode_out) + message)

    @staticmethod
    def _op_msg_command(body):
        command, offset = {}, 4
        while offset < len(body):
            kind, offset = body[offset], offset + 1
            size = struct.unpack_from("<i", body, offset)[0]
            if kind == 0:
                command.update(bson.decode(body[offset:offset + size]))
            else:
                name_end = body.index(b"\0", offset + 4)
                command[body[offset + 4:name_end].decode()] = bson.decode_all(body[name_end + 1:offset + size])
            offset += size
        return command

    def _read(self, count):
        data, received = bytearray(count), 0
        while received < count:
            got = self.request.recv_into(memoryview(data)[received:])
            if not got:
                return b""
            received += got
        return bytes(data)


@pytest.fixture
def wire():
    stand_in = WireMongo()
    yield stand_in
    stand_in.stop()


@contextlib.contextmanager
def serving_on(mongo_client, metrics=None, **settings_):
    """The service on a real pymongo client, and a stub for it."""
    with mongo_client, serving(mongo_client["CatalogServiceDB"], metrics, **settings_) as served:
        yield served


# ---------------------------------------------------------------------------
# The contract
# ---------------------------------------------------------------------------


def test_committed_stubs_match_the_proto(tmp_path):
    from grpc_tools import protoc

    status = protoc.main(["protoc", f"-I{HERE}", f"--python_out={tmp_path}", f"--pyi_out={tmp_path}",
                          f"--grpc_python_out={tmp_path}", os.path.join(HERE, "image_service.proto")])
    assert status == 0
    for name in ("image_service_pb2.py", "image_service_pb2.pyi", "image_service_pb2_grpc.py"):
        assert filecmp.cmp(tmp_path / name, os.path.join(HERE, name), shallow=False), (
            f"{name} is stale: regenerate it with the command in the README")


def test_the_original_contract_is_unchanged():
    service = pb2.DESCRIPTOR.services_by_name["ImageService"]
    assert pb2.DESCRIPTOR.package == "image_service"
    method = service.methods_by_name["DeleteImageByModelId"]
    assert (method.input_type.name, method.output_type.name) == ("DeleteImageRequest", "DeleteImageResponse")
    request = pb2.DeleteImageRequest.DESCRIPTOR.fields_by_name["model_id"]
    assert (request.number, request.type) == (1, request.TYPE_STRING)
    reply = pb2.DeleteImageResponse.DESCRIPTOR.fields_by_name
    assert (reply["success"].number, reply["success"].type) == (1, reply["success"].TYPE_BOOL)
    assert (reply["message"].number, reply["message"].type) == (2, reply["message"].TYPE_STRING)


def test_every_proto_element_is_commented():
    with open(os.path.join(HERE, "image_service.proto")) as proto:
        lines = [line.strip() for line in proto]
    for number, line in enumerate(lines):
        declares = line.startswith(("service ", "rpc ", "message ", "enum ", "OUTCOME_", "string ", "bool ",
                                    "int32 ", "repeated ", "Outcome "))
        if declares:
            assert lines[number - 1].startswith("//"), f"no comment above: {line}"


# ---------------------------------------------------------------------------
# What a delete does
# ---------------------------------------------------------------------------


def test_deletes_every_image_of_a_model_with_its_files_and_chunks(database, stub):
    for _ in range(3):
        upload(database, "chair")

    reply = delete(stub, "chair")

    assert (reply.success, reply.outcome) == (True, pb2.OUTCOME_DELETED)
    assert (reply.deleted_images, reply.deleted_files, reply.model_id) == (3, 3, "chair")
    assert reply.message == "deleted 3 images and 3 files"
    assert everything(database) == {"images": [], "fs.files": [], "fs.chunks": []}


def test_leaves_every_other_model_untouched(database, stub):
    upload(database, "chair")
    for bystander in ("table", "chair2", "Chair"):
        upload(database, bystander)
    before = {m: model_data(database, m) for m in ("table", "chair2", "Chair")}

    delete(stub, "chair")

    assert {m: model_data(database, m) for m in before} == before
    assert_store_consistent(database)


def test_follows_image_ids_stored_as_objectids(database, stub):
    file_id = upload(database, "chair")
    database.images.update_one({"image_id": str(file_id)}, {"$set": {"image_id": file_id}})

    reply = delete(stub, "chair")

    assert (reply.deleted_images, reply.deleted_files) == (1, 1)
    assert everything(database) == {"images": [], "fs.files": [], "fs.chunks": []}


def test_a_hex_model_id_also_matches_model_ids_stored_as_objectids(database, stub):
    model = ObjectId()
    upload(database, str(model))
    upload(database, str(model))
    database.images.update_one({"model_id": str(model)}, {"$set": {"model_id": model}})

    reply = delete(stub, str(model))

    assert (reply.deleted_images, reply.deleted_files) == (2, 2)
    assert everything(database)["images"] == []


def test_an_upper_case_hex_id_does_not_match_the_objectid(database, stub):
    model = ObjectId()
    upload(database, str(model))
    database.images.update_one({"model_id": str(model)}, {"$set": {"model_id": model}})

    reply = delete(stub, str(model).upper())

    assert reply.outcome == pb2.OUTCOME_NOTHING_TO_DELETE
    assert database.images.count_documents({"model_id": model}) == 1


@pytest.mark.parametrize("look_alike", [" chair", "chair ", "CHAIR", "chai", "chair\u200b", ".*", "^chair$",
                                        '{"$ne": null}', "{'$gt': ''}", "$where"])
def test_matches_the_model_id_exactly(database, stub, look_alike):
    upload(database, "chair")
    before = everything(database)

    reply = delete(stub, look_alike)

    assert (reply.success, reply.outcome) == (True, pb2.OUTCOME_NOTHING_TO_DELETE)
    assert everything(database) == before


def test_metadata_pointing_at_a_file_already_gone_is_removed_and_reported(database, stub):
    gone = upload(database, "chair")
    upload(database, "chair")
    database["fs.files"].delete_one({"_id": gone})
    database["fs.chunks"].delete_many({"files_id": gone})

    reply = delete(stub, "chair")

    assert (reply.success, reply.deleted_images, reply.deleted_files) == (True, 2, 1)
    assert "1 reference to a file already gone" in reply.message
    assert everything(database) == {"images": [], "fs.files": [], "fs.chunks": []}


@pytest.mark.parametrize("image_id", ["not-an-id", "", None, 42])
def test_metadata_with_an_invalid_image_id_is_removed_and_reported(database, stub, image_id):
    database.images.insert_one({"name": "chair.jpg", "image_id": image_id, "model_id": "chair"})

    reply = delete(stub, "chair")

    assert (reply.success, reply.deleted_images, reply.deleted_files) == (True, 1, 0)
    assert "1 reference had no valid file id" in reply.message
    assert images_of(database, "chair") == []


def test_a_model_without_images_succeeds_with_nothing_to_delete(database, stub):
    upload(database, "table")
    reply = delete(stub, "chair")
    assert (reply.success, reply.outcome, reply.deleted_images) == (True, pb2.OUTCOME_NOTHING_TO_DELETE, 0)
    assert reply.model_id == "chair" and "nothing to delete" in reply.message


def test_repeating_a_delete_is_safe(database, stub):
    upload(database, "chair")
    upload(database, "table")
    first, second = delete(stub, "chair"), delete(stub, "chair")
    assert (first.outcome, second.outcome) == (pb2.OUTCOME_DELETED, pb2.OUTCOME_NOTHING_TO_DELETE)
    assert second.success and len(images_of(database, "table")) == 1


REJECTED = {
    "empty": ("", "model_id is empty"),
    "too long": ("m" * 257, "model_id is longer than 256 characters"),
    "NUL": ("chair\x00", "model_id contains control characters"),
    "newline": ("chair\n", "model_id contains control characters"),
    "tab": ("\tchair", "model_id contains control characters"),
    "DEL": ("chair\x7f", "model_id contains control characters"),
    "C1 control": ("chair\x85", "model_id contains control characters"),
}


@pytest.mark.parametrize("model_id, reason", REJECTED.values(), ids=REJECTED.keys())
def test_rejects_bad_model_ids_and_touches_nothing(database, stub, model_id, reason):
    upload(database, "chair")
    upload(database, model_id.replace("\x00", ""))
    before = everything(database)

    reply = delete(stub, model_id)

    assert (reply.success, reply.outcome, reply.message) == (False, pb2.OUTCOME_INVALID_ARGUMENT, reason)
    assert everything(database) == before


def test_accepts_a_model_id_of_exactly_256_characters(database, stub):
    upload(database, "m" * 256)
    assert delete(stub, "m" * 256).deleted_images == 1


def test_a_body_that_does_not_parse_is_invalid_argument_with_one_warning_and_no_traceback(
        database, caplog, service_log):
    upload(database, "chair")
    invalid_utf8 = pb2.DeleteImageRequest(model_id="chair").SerializeToString().replace(b"chair", b"ch\xffir")
    truncated = pb2.DeleteImageRequest(model_id="chair").SerializeToString()[:-2]
    with serving(database) as (_, _, channel):
        raw_call = channel.unary_unary("/image_service.ImageService/DeleteImageByModelId")
        for body in (invalid_utf8, truncated):
            with pytest.raises(grpc.RpcError) as refused:
                raw_call(body, timeout=5)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "not a valid message" in refused.value.details()
            record = service_log.wait_for("status=INVALID_ARGUMENT")
            assert record.levelname == "WARNING" and record.exc_info is None
            assert [r for r in service_log.records if "DeleteImageByModelId" in r.getMessage()] == [record]
            assert "Traceback" not in caplog.text
            service_log.records.clear()
    assert len(images_of(database, "chair")) == 1


def test_a_model_id_of_megabytes_is_invalid_and_echoed_cut(database, stub):
    upload(database, "chair")
    huge = "m" * 3_000_000
    reply = delete(stub, huge)
    assert (reply.success, reply.outcome) == (False, pb2.OUTCOME_INVALID_ARGUMENT)
    assert reply.model_id == "m" * 256 + "...[cut from 3000000 characters]"
    assert reply.ByteSize() < 1024
    assert len(images_of(database, "chair")) == 1


def test_a_batch_of_1000_maximal_invalid_ids_gets_a_reply_a_client_can_receive(database, stub):
    # As long as the ids can be while the request stays under gRPC's 4 MB receive limit.
    model_ids = [f"{i:04d}" + "x" * 4146 for i in range(1000)]
    assert pb2.DeleteImagesRequest(model_ids=model_ids).ByteSize() < 4 * 1024 * 1024
    results = delete_batch(stub, model_ids)  # would be RESOURCE_EXHAUSTED past the client's 4 MB
    assert {result.outcome for result in results} == {pb2.OUTCOME_INVALID_ARGUMENT}
    assert [result.model_id[:4] for result in results] == [model_id[:4] for model_id in model_ids]
    assert pb2.DeleteImagesResponse(results=results).ByteSize() < 512 * 1024


def test_one_line_is_logged_per_call(database, stub, caplog):
    upload(database, "chair")
    with caplog.at_level(logging.INFO, logger="image_service"):
        delete(stub, "chair")
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("DeleteImageByModelId")]
    assert "model_id='chair' outcome=OUTCOME_DELETED deleted_images=1 deleted_files=1 ms=" in line


# ---------------------------------------------------------------------------
# Database commands, order and concurrency (at the wire level)
# ---------------------------------------------------------------------------


def test_a_delete_costs_four_commands_whatever_the_number_of_images(wire):
    for _ in range(25):
        upload(wire.db, "chair")
    with serving_on(wire.client()) as (stub_, _, _):
        reply = delete(stub_, "chair")
    assert reply.deleted_images == 25
    assert wire.names() == ["find", "delete", "delete", "delete"]


def test_deletes_files_then_chunks_then_the_metadata_it_read(wire):
    upload(wire.db, "chair")
    with serving_on(wire.client()) as (stub_, _, _):
        delete(stub_, "chair")
    find, files, chunks, metadata = wire.commands
    assert (files["delete"], chunks["delete"], metadata["delete"]) == ("fs.files", "fs.chunks", "images")
    assert set(metadata["deletes"][0]["q"]) == {"_id"}


def test_a_model_with_a_million_images_is_deleted_completely_with_exact_counts():
    with synthetic_mongo("huge", 1_000_000) as uri, pymongo.MongoClient(uri, serverSelectionTimeoutMS=60_000) as client:
        (reply,) = server.delete_and_describe(client["CatalogServiceDB"], ["huge"], time.monotonic() + 120)
        report = client.admin.command("report")
    assert (reply.success, reply.deleted_images, reply.deleted_files) == (True, 1_000_000, 1_000_000)
    assert report["present"] == {"images": 0, "fs.files": 0, "fs.chunks": 0}
    # 4 commands per 100,000 images (and a last, empty getMore), files before chunks before metadata:
    assert [(name, collection) for name, collection, _ in report["commands"]] == (
        [("find", "images")] + [("getMore", "1")] * 10 + [("delete", "fs.files")] * 10
        + [("delete", "fs.chunks")] * 10 + [("delete", "images")] * 10)
    assert max(size for _, _, size in report["commands"]) < 2 * 1024 * 1024  # MongoDB's limit: 16 MB


def test_a_model_without_images_costs_one_read(wire):
    with serving_on(wire.client()) as (stub_, _, _):
        delete(stub_, "chair")
    assert wire.names() == ["find"]


def test_an_image_uploaded_during_the_delete_is_left_whole(wire):
    upload(wire.db, "chair")
    late = {}
    wire.faults[2] = lambda: late.setdefault("file_id", upload(wire.db, "chair"))
    with serving_on(wire.client()) as (stub_, _, _):
        reply = delete(stub_, "chair")
    assert reply.deleted_images == 1
    (survivor,) = images_of(wire.db, "chair")
    assert survivor["image_id"] == str(late["file_id"])
    assert wire.db["fs.chunks"].count_documents({"files_id": late["file_id"]}) == 2
    assert_store_consistent(wire.db)


# ---------------------------------------------------------------------------
# Database failures
# ---------------------------------------------------------------------------


def test_concurrent_deletes_of_one_model_count_each_image_once(wire):
    for _ in range(5):
        upload(wire.db, "chair")
    second = []
    with wire.client() as client:
        db = client["CatalogServiceDB"]
        # Between the first delete's read and its first delete, a second
        # delete of the same model runs from start to end.
        wire.faults[2] = lambda: second.extend(server.delete_and_describe(db, ["chair"], time.monotonic() + 10))
        (first,) = server.delete_and_describe(db, ["chair"], time.monotonic() + 10)
    (second,) = second
    assert first.deleted_images + second.deleted_images == 5
    assert first.deleted_files + second.deleted_files == 5
    assert (first.success, first.outcome) == (True, pb2.OUTCOME_NOTHING_TO_DELETE)
    assert "a concurrent delete removed its 5 images first" in first.message
    assert everything(wire.db) == {"images": [], "fs.files": [], "fs.chunks": []}


def test_an_unreachable_database_is_reported_as_unavailable_within_mongo_timeout(caplog):
    config = server.load_config({"MONGO_USER": "svc", "MONGO_PASSWORD": "s3cret@pw-0123456789",
                                 "MONGO_HOST": "127.0.0.1",
                                 "MONGO_PORT": str(closed_port()), "MONGO_TIMEOUT_MS": "300"})
    with serving_on(server.connect_to_mongo(config), mongo_timeout_s=0.3) as (stub_, _, _):
        started = time.monotonic()
        reply = delete(stub_, "chair")
        elapsed = time.monotonic() - started
    assert (reply.success, reply.outcome) == (False, pb2.OUTCOME_UNAVAILABLE)
    assert reply.message == "database unavailable or too slow; retry later"
    assert elapsed < 5, f"took {elapsed:.1f} s: the driver's 30 s default is not bounded"
    assert "s3cret" not in caplog.text


def test_a_database_error_is_reported_as_internal_and_the_server_keeps_serving(wire):
    upload(wire.db, "chair")
    wire.faults[1] = "error"
    with serving_on(wire.client()) as (stub_, _, _):
        failed, retried = delete(stub_, "chair"), delete(stub_, "chair")
    assert (failed.success, failed.outcome) == (False, pb2.OUTCOME_INTERNAL)
    assert "injected" not in failed.message
    assert (retried.success, retried.deleted_images) == (True, 1)


def test_a_database_that_never_answers_fails_within_mongo_timeout():
    with silent_socket() as port:
        config = server.Config(mongo_uri=f"mongodb://127.0.0.1:{port}/", mongo_timeout_s=0.5)
        with serving_on(server.connect_to_mongo(config), mongo_timeout_s=0.5) as (stub_, _, _):
            started = time.monotonic()
            reply = delete(stub_, "chair")
            elapsed = time.monotonic() - started
    assert reply.outcome == pb2.OUTCOME_UNAVAILABLE
    assert elapsed < 5, f"took {elapsed:.1f} s: the driver's 30 s default is not bounded"


# ---------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------


def test_credentials_are_percent_escaped_in_the_uri():
    uri = server.build_mongo_uri({"MONGO_USER": "app@team", "MONGO_PASSWORD": "p@ss:w/rd%?#-0123456789",
                                  "MONGO_HOST": "db.internal", "MONGO_PORT": "27018"})
    assert uri == "mongodb://app%40team:p%40ss%3Aw%2Frd%25%3F%23-0123456789@db.internal:27018/?authSource=admin"
    parsed = pymongo.uri_parser.parse_uri(uri)
    assert (parsed["username"], parsed["password"]) == ("app@team", "p@ss:w/rd%?#-0123456789")


def test_without_a_user_the_uri_carries_no_credentials():
    assert server.build_mongo_uri({}) == "mongodb://localhost:27017/"


def test_a_password_without_a_user_is_refused():
    with pytest.raises(server.ConfigError, match="MONGO_PASSWORD is set but MONGO_USER is not"):
        server.build_mongo_uri({"MONGO_PASSWORD": "x"})


def test_mongo_uri_overrides_the_parts():
    env = {"MONGO_URI": "mongodb+srv://u:p-0123456789abcdef@cluster0.example.net/", "MONGO_HOST": "ignored"}
    assert server.load_config(env).mongo_uri == "mongodb+srv://u:p-0123456789abcdef@cluster0.example.net/"


def test_defaults():
    config = server.load_config({})
    assert (config.mongo_uri, config.mongo_db, config.mongo_timeout_s) == (
        "mongodb://localhost:27017/", "CatalogServiceDB", 5.0)
    assert (config.grpc_host, config.grpc_port, config.max_workers, config.max_concurrent_rpcs) == (
        "0.0.0.0", 5014, 10, 100)
    assert (config.reflection, config.auth_tokens, config.shutdown_grace_s, config.log_format) == (
        True, (), 10.0, "text")


def test_the_database_is_described_without_credentials():
    config = server.load_config({"MONGO_USER": "svc", "MONGO_PASSWORD": "hunter2-0123456789", "MONGO_HOST": "db1"})
    assert server.describe_database(config) == "mongodb://db1:27017/CatalogServiceDB"


BAD_SETTINGS = {
    "MONGO_PORT": "abc", "GRPC_PORT": "70000", "MONGO_TIMEOUT_MS": "0", "GRPC_MAX_WORKERS": "-1",
    "GRPC_MAX_CONCURRENT_RPCS": "many", "GRPC_REFLECTION": "maybe", "SHUTDOWN_GRACE_S": "soon",
    "LOG_LEVEL": "LOUD", "LOG_FORMAT": "xml", "GRPC_TLS_CERT": "/no/such/cert.pem", "SHUTDOWN_DELAY_S": "-1",
}


@pytest.mark.parametrize("name, value", BAD_SETTINGS.items())
def test_a_bad_setting_is_refused_naming_the_variable(name, value):
    with pytest.raises(server.ConfigError, match=name):
        server.load_config({name: value})


def run_server_process(env_overrides, *args, cwd=None, timeout=20):
    env = {**os.environ, **env_overrides}
    return subprocess.run([sys.executable, SERVER_SCRIPT, *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


def test_a_bad_setting_stops_start_up_with_one_line_and_exit_code_2(tmp_path):
    done = run_server_process({"MONGO_PORT": "abc"}, cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "configuration error: MONGO_PORT must be a whole number from 1 to 65535, got 'abc'"]


@pytest.mark.parametrize("uri", ["mongodb://svc:hunter2-0123456789@db:abc/", "mongodb://svc:hun@ter2-0123456789@db/", "mysql://db/"])
def test_a_bad_mongo_uri_stops_start_up_with_one_line_and_exit_code_2(tmp_path, uri):
    done = run_server_process({"MONGO_URI": uri}, cwd=tmp_path)
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("configuration error: MONGO_URI")
    assert "hunter2" not in line and "ter2" not in line


def test_a_port_already_in_use_stops_start_up_with_one_line_and_exit_code_2(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = run_server_process({"GRPC_HOST": "127.0.0.1", "GRPC_PORT": str(port)}, "--in-memory", cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"configuration error: GRPC_PORT: cannot listen on 127.0.0.1:{port}: address already in use"]


FAIL_CLOSED = {
    "an empty token list": ({"GRPC_AUTH_TOKEN": ","}, "GRPC_AUTH_TOKEN is set but holds no token"),
    "a blank token list": ({"GRPC_AUTH_TOKEN": " "}, "GRPC_AUTH_TOKEN is set but holds no token"),
    "a list of blank tokens": ({"GRPC_AUTH_TOKEN": ", ,"}, "GRPC_AUTH_TOKEN is set but holds no token"),
    "a short token": ({"GRPC_AUTH_TOKEN": "long-enough-token-123,abc"},
                      "GRPC_AUTH_TOKEN: token 2 of 2 is shorter than 16 characters"),
    "a short password": ({"MONGO_USER": "svc", "MONGO_PASSWORD": "abc"},
                         "MONGO_PASSWORD is shorter than 16 characters"),
    "a short password in the URI": ({"MONGO_URI": "mongodb://svc:abc@db/"},
                                    "MONGO_URI: the password is shorter than 16 characters"),
    "an unclosed IPv6 literal": ({"MONGO_URI": "mongodb://[::1"}, "MONGO_URI: "),
    "a URI without a scheme": ({"MONGO_URI": "localhost:27017"},
                               "MONGO_URI must start with mongodb:// or mongodb+srv://"),
    "unacknowledged writes": ({"MONGO_URI": "mongodb://db/?w=0"}, "MONGO_URI: w=0 (unacknowledged writes)"),
    "a port in MONGO_HOST": ({"MONGO_HOST": "host:27017"}, "MONGO_HOST must be a host name or an IP address"),
    "a dot in the database name": ({"MONGO_DB": "a.b"}, "MONGO_DB must be under 64 bytes"),
    "a slash in the database name": ({"MONGO_DB": "bad/name"}, "MONGO_DB must be under 64 bytes"),
    "a database name of 64 bytes": ({"MONGO_DB": "d" * 64}, "MONGO_DB must be under 64 bytes"),
}


@pytest.mark.parametrize("env, message", FAIL_CLOSED.values(), ids=FAIL_CLOSED.keys())
def test_a_setting_that_would_fail_later_or_open_is_refused_at_start_up(env, message):
    with pytest.raises(server.ConfigError) as refused:
        server.load_config(env)
    assert str(refused.value).startswith(message)
    assert "abc" not in str(refused.value)  # never the secret


def test_a_password_with_uri_delimiters_is_accepted_and_never_described(tmp_path):
    config = server.load_config({"MONGO_URI": "mongodb://svc:pa[ss]w0rd-0123456789@db1,db2:27018/"})
    assert server.describe_database(config) == "mongodb://db1:27017,db2:27018/CatalogServiceDB"


@pytest.fixture
def tls_files(tmp_path, certificates):
    """Good files, plus a garbage one, an empty one and a key of another certificate."""
    import trustme

    other = trustme.CA().issue_cert("127.0.0.1")
    files = {"garbage": tmp_path / "garbage.pem", "empty": tmp_path / "empty.pem",
             "other_key": tmp_path / "other.key"}
    files["garbage"].write_text("not a certificate")
    files["empty"].write_text("")
    other.private_key_pem.write_to_path(files["other_key"])
    return {**certificates, **{name: str(path) for name, path in files.items()}}


TLS_MISTAKES = {
    "a garbage certificate": ({"GRPC_TLS_CERT": "garbage"}, "GRPC_TLS_CERT: no PEM certificate in"),
    "a garbage key": ({"GRPC_TLS_KEY": "garbage"}, "GRPC_TLS_KEY: "),
    "a key of another certificate": ({"GRPC_TLS_KEY": "other_key"}, "GRPC_TLS_KEY: "),
    "an empty client CA": ({"GRPC_TLS_CLIENT_CA": "empty"}, "GRPC_TLS_CLIENT_CA: no PEM certificate in"),
    "a garbage client CA": ({"GRPC_TLS_CLIENT_CA": "garbage"}, "GRPC_TLS_CLIENT_CA: no PEM certificate in"),
}


@pytest.mark.parametrize("mistake, message", TLS_MISTAKES.values(), ids=TLS_MISTAKES.keys())
def test_tls_files_are_loaded_and_matched_before_grpc_sees_them(tls_files, mistake, message):
    env = {"GRPC_TLS_CERT": tls_files["cert"], "GRPC_TLS_KEY": tls_files["key"]}
    env.update({name: tls_files[file] for name, file in mistake.items()})
    with pytest.raises(server.ConfigError) as refused:
        server.load_config(env)
    assert str(refused.value).startswith(message)
    if "other_key" in mistake.values():
        assert "does not belong to the certificate in GRPC_TLS_CERT" in str(refused.value)


@pytest.mark.parametrize("env, variable", [
    ({"GRPC_AUTH_TOKEN": ","}, "GRPC_AUTH_TOKEN"),
    ({"MONGO_URI": "mongodb://svc:pa[ss-0123456789@[::1/"}, "MONGO_URI"),
    ({"MONGO_DB": "bad/name"}, "MONGO_DB"),
    ({"GRPC_HOST": "no-such-host.invalid"}, "GRPC_HOST"),
    ({"GRPC_HOST": "192.0.2.1"}, "GRPC_HOST"),  # TEST-NET-1: no address of this machine
    ({"GRPC_TLS_CERT": __file__, "GRPC_TLS_KEY": __file__}, "GRPC_TLS_CERT"),
], ids=["tokens", "uri", "database", "unresolvable host", "foreign host", "tls"])
def test_a_refused_setting_is_one_line_naming_it_and_exit_code_2(tmp_path, env, variable):
    done = run_server_process(env, "--in-memory", cwd=tmp_path)
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(f"configuration error: {variable}")
    assert "0123456789" not in line


def test_an_empty_exported_variable_may_not_hide_a_dotenv_value(tmp_path, monkeypatch):
    (tmp_path / ".env").write_text("MONGO_URI=mongodb://db.internal/\n")
    monkeypatch.setenv("MONGO_URI", "")
    with pytest.raises(server.ConfigError, match="MONGO_URI is exported empty, which would hide its value in .env"):
        server.read_environment(tmp_path / ".env")


def test_secrets_are_redacted_only_where_they_stand_whole():
    secret = "tok-0123456789abcdef"
    line = f"auth=Bearer {secret}; next{secret}x; {secret}."
    assert server.redact(line, [secret]) == f"auth=Bearer ***; next{secret}x; ***."


def test_settings_come_from_a_dotenv_file_and_the_environment_wins(tmp_path, monkeypatch):
    (tmp_path / ".env").write_text("MONGO_DB=FromFile\nMONGO_HOST=file-host\n")
    monkeypatch.setenv("MONGO_HOST", "env-host")
    config = server.load_config(server.read_environment(tmp_path / ".env"))
    assert (config.mongo_db, config.mongo_uri) == ("FromFile", "mongodb://env-host:27017/")


def test_env_example_lists_every_variable():
    with open(os.path.join(HERE, ".env.example")) as example:
        listed = {line.split("=")[0].lstrip("# ").strip() for line in example if "=" in line}
    with open(SERVER_SCRIPT) as source:
        code = source.read()
    used = {name for name in listed if f'"{name}"' in code}
    assert listed == used
    for name in ("MONGO_URI", "MONGO_HOST", "MONGO_PORT", "MONGO_DB", "MONGO_USER", "MONGO_PASSWORD",
                 "MONGO_AUTH_SOURCE", "MONGO_TIMEOUT_MS", "GRPC_HOST", "GRPC_PORT", "GRPC_MAX_WORKERS",
                 "GRPC_MAX_CONCURRENT_RPCS", "GRPC_REFLECTION", "GRPC_TLS_CERT", "GRPC_TLS_KEY",
                 "GRPC_TLS_CLIENT_CA", "GRPC_AUTH_TOKEN", "SHUTDOWN_DELAY_S", "SHUTDOWN_GRACE_S",
                 "HEALTH_CHECK_INTERVAL_S", "LOG_LEVEL", "LOG_FORMAT", "METRICS_PORT", "METRICS_HOST"):
        assert name in listed and f'"{name}"' in code, name


# ---------------------------------------------------------------------------
# The process: start-up, in-memory mode, signals, client
# ---------------------------------------------------------------------------


class ServerProcess:
    """``python3 image_service_server.py`` in a child process on a free port."""

    def __init__(self, tmp_path, env_overrides=(), *args):
        self.port = closed_port()
        env = {**os.environ, "GRPC_HOST": "127.0.0.1", "GRPC_PORT": str(self.port), **dict(env_overrides)}
        self.stderr_path = tmp_path / f"server-{self.port}.log"
        with open(self.stderr_path, "w") as stderr:
            self.process = subprocess.Popen([sys.executable, SERVER_SCRIPT, *args], env=env, cwd=tmp_path,
                                            stdout=subprocess.DEVNULL, stderr=stderr)
        self.address = f"127.0.0.1:{self.port}"
        self.channel = grpc.insecure_channel(self.address)
        grpc.channel_ready_future(self.channel).result(timeout=20)
        self.stub = pb2_grpc.ImageServiceStub(self.channel)

    def log(self):
        return self.stderr_path.read_text()

    def stop(self, signum=signal.SIGTERM):
        self.process.send_signal(signum)
        code = self.process.wait(timeout=20)
        self.channel.close()
        return code


def test_start_up_logs_the_address_and_database_but_never_the_password(tmp_path):
    running = ServerProcess(tmp_path, {"MONGO_USER": "svc", "MONGO_PASSWORD": "hunter2!-0123456789",
                                       "MONGO_HOST": "127.0.0.1", "MONGO_PORT": str(closed_port())})
    assert running.stop() == 0
    log_text = running.log()
    assert f"serving image_service.ImageService on 127.0.0.1:{running.port}" in log_text
    assert "mongodb://127.0.0.1:" in log_text and "/CatalogServiceDB" in log_text
    assert "hunter2" not in log_text


def test_in_memory_mode_deletes_a_sample_image_with_no_mongodb(tmp_path):
    running = ServerProcess(tmp_path, {}, "--in-memory")
    reply = running.stub.DeleteImageByModelId(pb2.DeleteImageRequest(model_id="sample-chair"), timeout=10)
    assert running.stop() == 0
    assert (reply.success, reply.deleted_images, reply.deleted_files) == (True, 2, 2)
    assert "try: python3 image_service_client.py sample-chair" in running.log()


def test_sigterm_lets_a_delete_in_flight_finish_then_exits_0(tmp_path, wire):
    upload(wire.db, "chair")
    reached, release = threading.Event(), threading.Event()
    wire.faults[2] = lambda: (reached.set(), release.wait(20))
    running = ServerProcess(tmp_path, {"MONGO_URI": wire.uri, "HEALTH_CHECK_INTERVAL_S": "0.1"})
    in_flight = running.stub.DeleteImageByModelId.future(pb2.DeleteImageRequest(model_id="chair"), timeout=20)
    assert reached.wait(10)

    updates = watch_health(running.channel)
    assert wait_for_status(updates, SERVING)
    running.process.send_signal(signal.SIGTERM)
    assert next(updates).status == NOT_SERVING  # shutdown has begun, the delete is still running
    updates.cancel()
    release.set()

    assert in_flight.result().deleted_images == 1
    assert running.process.wait(timeout=20) == 0
    assert everything(wire.db)["images"] == []


def test_sigint_stops_the_server_with_exit_code_0(tmp_path):
    running = ServerProcess(tmp_path, {}, "--in-memory")
    assert running.stop(signal.SIGINT) == 0


def test_the_client_prints_each_result_and_fails_if_any_failed(database, capsys):
    upload(database, "chair")
    with serving(database) as (_, running, _):
        address = f"127.0.0.1:{running.port}"
        ok_code = client_cli.main(["chair", "--address", address])
        bad_code = client_cli.main(["table", "", "--address", address])
    lines = capsys.readouterr().out.splitlines()
    assert (ok_code, bad_code) == (0, 1)
    assert lines[0].startswith("chair\tok\tOUTCOME_DELETED\timages=1\tfiles=1")
    assert lines[1].startswith("table\tok\tOUTCOME_NOTHING_TO_DELETE")
    assert lines[2].startswith("\tFAILED\tOUTCOME_INVALID_ARGUMENT")


def test_the_client_reports_a_server_it_cannot_reach(capsys):
    code = client_cli.main(["chair", "--address", f"127.0.0.1:{closed_port()}", "--timeout", "1"])
    error = capsys.readouterr().err
    assert code == 3
    assert error.startswith(("call failed: UNAVAILABLE", "call failed: DEADLINE_EXCEEDED"))


@pytest.mark.parametrize("argv, message", [
    (["--apply"], "--apply needs --sweep-orphans"),
    (["--apply-files"], "--apply-files needs --sweep-orphans"),
    (["--min-age-s", "60"], "--min-age-s needs --sweep-orphans"),
    (["--batch-size", "10"], "--batch-size needs --sweep-orphans"),
    (["--sweep-orphans", "--min-age-s", "-5"], "--min-age-s must be zero or more seconds"),
    (["--sweep-orphans", "--min-age-s", "nan"], "--min-age-s must be zero or more seconds"),
])
def test_the_server_refuses_options_that_make_no_sense(tmp_path, argv, message):
    done = run_server_process({}, "--in-memory", *argv, cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].endswith(f"error: {message}")


@pytest.mark.parametrize("argv", [["--timeout", "0"], ["--timeout", "-1"], ["--timeout", "abc"],
                                  ["--address", "localhost"], ["--address", "localhost:0"]])
def test_the_client_refuses_a_bad_timeout_or_an_address_without_a_port(argv, capsys):
    with pytest.raises(SystemExit) as usage:
        client_cli.main(["chair", *argv])
    assert usage.value.code == 2
    assert "must be" in capsys.readouterr().err


def test_the_client_names_a_bad_timeout_in_its_environment_in_one_line(monkeypatch, capsys):
    monkeypatch.setenv("IMAGE_SERVICE_TIMEOUT", "abc")
    assert client_cli.main(["chair"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: IMAGE_SERVICE_TIMEOUT must be a number of seconds above 0, got 'abc'"]


def test_the_client_ends_on_ctrl_c_with_one_line_and_exit_code_130():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.settimeout(20)
        client = subprocess.Popen([sys.executable, os.path.join(HERE, "image_service_client.py"), "chair",
                                   "--address", f"127.0.0.1:{listener.getsockname()[1]}", "--timeout", "60"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        connection, _ = listener.accept()  # connected, and waiting for an answer that never comes
        with connection:
            client.send_signal(signal.SIGINT)
            _, err = client.communicate(timeout=20)
    assert client.returncode == 130
    assert err.strip().splitlines() == ["interrupted"]


def test_the_client_says_plainly_when_tls_settings_do_not_match(database, certificates, capsys):
    with serving(database, **tls_settings(certificates)) as (_, running, _):
        code = client_cli.main(["chair", "--address", f"127.0.0.1:{running.port}", "--timeout", "5"])
    assert code == 3
    assert "(if the server serves TLS, pass --tls-ca)" in capsys.readouterr().err


# ---------------------------------------------------------------------------
# Production behaviour: health, reflection, deadlines, shedding
# ---------------------------------------------------------------------------


def watch_health(channel, service=""):
    """The health service's stream of updates for ``service``."""
    return health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=service), timeout=20)


def wait_for_status(updates, wanted):
    for update in updates:
        if update.status == wanted:
            return True
    return False


@pytest.mark.parametrize("service", ["", "image_service.ImageService"])
def test_health_follows_mongodb_down_and_back_up(service):
    port = closed_port()
    mongo = pymongo.MongoClient(f"mongodb://127.0.0.1:{port}/?directConnection=true", serverSelectionTimeoutMS=100)
    with serving_on(mongo, mongo_timeout_s=0.2) as (_, _, channel):
        updates = watch_health(channel, service)
        assert wait_for_status(updates, NOT_SERVING)
        stand_in = WireMongo(port=port)
        try:
            assert wait_for_status(updates, SERVING)
            stand_in.hang()
            assert wait_for_status(updates, NOT_SERVING)
        finally:
            updates.cancel()
            stand_in.stop()


def test_health_reports_not_serving_as_soon_as_shutdown_begins(database):
    with serving(database) as (_, running, channel):
        updates = watch_health(channel, "image_service.ImageService")
        assert wait_for_status(updates, SERVING)
        stopping = threading.Thread(target=running.stop, args=(5,))
        stopping.start()
        assert next(updates).status == NOT_SERVING
        updates.cancel()
        stopping.join()


def list_services(channel, metadata=None):
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    (reply,) = stub.ServerReflectionInfo(iter([request]), timeout=5, metadata=metadata)
    return {service.name for service in reply.list_services_response.service}


def test_reflection_lists_the_services(database):
    with serving(database) as (_, _, channel):
        assert {"image_service.ImageService", "grpc.health.v1.Health"} <= list_services(channel)


def test_reflection_can_be_turned_off(database):
    with serving(database, reflection=False) as (_, _, channel):
        with pytest.raises(grpc.RpcError) as refused:
            list_services(channel)
    assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_a_client_deadline_bounds_the_database_work(wire):
    upload(wire.db, "chair")
    with serving_on(wire.client(timeout_ms=30_000), mongo_timeout_s=30, max_workers=4) as (stub_, _, _):
        wire.hang()
        stuck = [stub_.DeleteImageByModelId.future(pb2.DeleteImageRequest(model_id="chair"), timeout=0.3)
                 for _ in range(30)]
        for call in stuck:  # each ends by its deadline, or just before it with a timeout of its own
            try:
                assert call.result().outcome == pb2.OUTCOME_UNAVAILABLE
            except grpc.RpcError as expired:
                assert expired.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        wire.recover()
        # With the four workers still held by the hung calls (up to 30 s
        # each), this call could not be served within its deadline.
        reply = stub_.DeleteImageByModelId(pb2.DeleteImageRequest(model_id="chair"), timeout=5)
    assert (reply.success, reply.deleted_images) == (True, 1)


def test_calls_past_the_concurrency_limit_are_shed_at_once(wire):
    with serving_on(wire.client(), max_concurrent_rpcs=2) as (stub_, _, _):
        wire.hang()
        held = [stub_.DeleteImageByModelId.future(pb2.DeleteImageRequest(model_id="chair"), timeout=20)
                for _ in range(2)]
        assert wire.arrivals.acquire(timeout=10) and wire.arrivals.acquire(timeout=10)
        with pytest.raises(grpc.RpcError) as shed:
            delete(stub_, "chair")
        wire.recover()
        replies = [call.result() for call in held]
    assert shed.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert all(reply.success for reply in replies)


# ---------------------------------------------------------------------------
# Serving on the event loop: admission, health and the drain
# ---------------------------------------------------------------------------


def test_health_answers_at_once_while_mongodb_hangs_and_the_delete_bound_is_full(wire):
    with serving_on(wire.client(timeout_ms=30_000), mongo_timeout_s=30, max_workers=3,
                    max_concurrent_rpcs=3) as (stub_, _, channel):
        wire.hang()
        held = [stub_.DeleteImageByModelId.future(pb2.DeleteImageRequest(model_id=f"m{i}"), timeout=30)
                for i in range(3)]
        for _ in held:
            assert wire.arrivals.acquire(timeout=10)
        with pytest.raises(grpc.RpcError) as shed:
            delete(stub_, "one-more")
        check = health_pb2_grpc.HealthStub(channel).Check
        answered_in = []
        for _ in range(20):
            started = time.monotonic()
            check(health_pb2.HealthCheckRequest(service="image_service.ImageService"), timeout=2)
            answered_in.append(time.monotonic() - started)
        wire.recover()
        outcomes = {call.result().outcome for call in held}
    assert shed.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert max(answered_in) < 0.1
    assert outcomes == {pb2.OUTCOME_NOTHING_TO_DELETE}


def test_open_reflection_streams_hold_no_thread_and_do_not_delay_deletes(database):
    upload(database, "chair")
    with serving(database, max_workers=2) as (stub_, _, channel):
        reflection_stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        inboxes = [queue.Queue() for _ in range(20)]
        streams = [reflection_stub.ServerReflectionInfo(iter(inbox.get, None), timeout=30) for inbox in inboxes]
        for inbox, stream in zip(inboxes, streams):
            inbox.put(request)
            assert next(stream).list_services_response.service  # open, and answered once
        reply = stub_.DeleteImageByModelId(pb2.DeleteImageRequest(model_id="chair"), timeout=2)
        for inbox in inboxes:
            inbox.put(None)
    assert (reply.success, reply.deleted_images) == (True, 1)


def test_a_cancelled_call_frees_its_admission_slot_at_once(wire):
    with serving_on(wire.client(timeout_ms=30_000), mongo_timeout_s=30, max_concurrent_rpcs=1) as (stub_, running, _):
        wire.hang()
        first = stub_.DeleteImageByModelId.future(pb2.DeleteImageRequest(model_id="first"), timeout=30)
        assert wire.arrivals.acquire(timeout=10)
        first.cancel()
        # Its database thread still waits on the hung MongoDB, but its slot is free:
        running.run(running.running.admission.wait_idle(10))
        second = stub_.DeleteImageByModelId.future(pb2.DeleteImageRequest(model_id="second"), timeout=30)
        assert wire.arrivals.acquire(timeout=10)  # admitted, and at the database
        wire.recover()
        assert second.result().outcome == pb2.OUTCOME_NOTHING_TO_DELETE


def test_sigterm_with_mongodb_hung_exits_0_within_the_grace_and_names_the_abandoned_call(tmp_path, wire):
    running = ServerProcess(tmp_path, {"MONGO_URI": wire.uri, "MONGO_TIMEOUT_MS": "60000", "SHUTDOWN_GRACE_S": "1"})
    wire.hang()
    stuck = running.stub.DeleteImageByModelId.future(pb2.DeleteImageRequest(model_id="chair"), timeout=60)
    assert wire.arrivals.acquire(timeout=10)
    signalled = time.monotonic()
    running.process.send_signal(signal.SIGTERM)
    code = running.process.wait(timeout=30)
    took = time.monotonic() - signalled
    lines = running.log().strip().splitlines()
    assert code == 0 and took < 1 + 1
    assert any("abandoned at shutdown: DeleteImageByModelId" in line and "'chair'" in line for line in lines)
    assert lines[-1].endswith("stopped")
    with pytest.raises(grpc.RpcError):
        stuck.result()


def test_during_the_shutdown_delay_health_is_not_serving_and_deletes_still_succeed(tmp_path):
    running = ServerProcess(tmp_path, {"SHUTDOWN_DELAY_S": "30", "HEALTH_CHECK_INTERVAL_S": "0.1"}, "--in-memory")
    updates = watch_health(running.channel, "image_service.ImageService")
    assert wait_for_status(updates, SERVING)
    running.process.send_signal(signal.SIGTERM)
    assert next(updates).status == NOT_SERVING
    updates.cancel()
    reply = running.stub.DeleteImageByModelId(pb2.DeleteImageRequest(model_id="sample-chair"), timeout=5)
    assert (reply.success, reply.deleted_images) == (True, 2)
    assert running.stop() == 0  # the second signal: no waiting out the 30 s


def test_a_second_signal_during_the_drain_exits_at_once(tmp_path):
    running = ServerProcess(tmp_path, {"SHUTDOWN_DELAY_S": "30"}, "--in-memory")
    running.process.send_signal(signal.SIGTERM)
    grpc.channel_ready_future(running.channel).result(timeout=10)
    health_pb2_grpc.HealthStub(running.channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    signalled = time.monotonic()
    assert running.stop(signal.SIGINT) == 0
    assert time.monotonic() - signalled < 5
    lines = running.log().strip().splitlines()
    assert "second signal: exiting now" in running.log() and lines[-1].endswith("stopped")


# ---------------------------------------------------------------------------
# TLS, mTLS and tokens
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certificates(tmp_path_factory):
    """A CA, a server certificate for 127.0.0.1 and a client certificate, as files."""
    import trustme

    folder = tmp_path_factory.mktemp("certificates")
    ca = trustme.CA()
    files = {"ca": folder / "ca.pem", "cert": folder / "server.pem", "key": folder / "server.key",
             "client_cert": folder / "client.pem", "client_key": folder / "client.key"}
    ca.cert_pem.write_to_path(files["ca"])
    server_cert = ca.issue_cert("127.0.0.1", "localhost")
    server_cert.private_key_pem.write_to_path(files["key"])
    server_cert.cert_chain_pems[0].write_to_path(files["cert"])
    client_cert = ca.issue_cert("catalog-service@example.internal")
    client_cert.private_key_pem.write_to_path(files["client_key"])
    client_cert.cert_chain_pems[0].write_to_path(files["client_cert"])
    return {name: str(path) for name, path in files.items()}


def tls_settings(certificates, mutual=False):
    env = {"GRPC_TLS_CERT": certificates["cert"], "GRPC_TLS_KEY": certificates["key"]}
    if mutual:
        env["GRPC_TLS_CLIENT_CA"] = certificates["ca"]
    config = server.load_config(env)
    return {"tls_cert": config.tls_cert, "tls_key": config.tls_key, "tls_client_ca": config.tls_client_ca}


def tls_channel(port, certificates, with_client_cert=False):
    def read(name):
        with open(certificates[name], "rb") as file:
            return file.read()

    credentials = grpc.ssl_channel_credentials(
        read("ca"),
        private_key=read("client_key") if with_client_cert else None,
        certificate_chain=read("client_cert") if with_client_cert else None)
    return grpc.secure_channel(f"127.0.0.1:{port}", credentials)


def test_tls_serves_encrypted_calls_and_refuses_plaintext(database, certificates):
    upload(database, "chair")
    with serving(database, **tls_settings(certificates)) as (plain_stub, running, _):
        with pytest.raises(grpc.RpcError) as refused:
            delete(plain_stub, "chair")
        with tls_channel(running.port, certificates) as channel:
            reply = delete(pb2_grpc.ImageServiceStub(channel), "chair")
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert reply.deleted_images == 1


def test_mtls_requires_a_client_certificate_signed_by_the_client_ca(database, certificates):
    upload(database, "chair")
    with serving(database, **tls_settings(certificates, mutual=True)) as (_, running, _):
        with tls_channel(running.port, certificates) as channel:
            with pytest.raises(grpc.RpcError) as refused:
                delete(pb2_grpc.ImageServiceStub(channel), "chair")
        with tls_channel(running.port, certificates, with_client_cert=True) as channel:
            reply = delete(pb2_grpc.ImageServiceStub(channel), "chair")
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert reply.deleted_images == 1


@pytest.mark.parametrize("variable", ["GRPC_TLS_CERT", "GRPC_TLS_KEY", "GRPC_TLS_CLIENT_CA"])
def test_a_missing_tls_file_stops_start_up_with_one_line_and_exit_code_2(tmp_path, certificates, variable):
    env = {"GRPC_TLS_CERT": certificates["cert"], "GRPC_TLS_KEY": certificates["key"], variable: "/no/such.pem"}
    done = run_server_process(env, cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"configuration error: {variable}: cannot read /no/such.pem: No such file or directory"]


TOKENS = {"GRPC_AUTH_TOKEN": "old-token-1b2c3d4e5f, new-token-9f8e7d6c5b"}


def test_calls_without_a_valid_token_are_refused_and_touch_nothing(database, caplog):
    upload(database, "chair")
    before = everything(database)
    tokens = server.load_config(TOKENS).auth_tokens
    with caplog.at_level(logging.DEBUG), serving(database, auth_tokens=tokens) as (stub_, _, channel):
        codes = []
        for metadata in (None, [("authorization", "Bearer wrong")], [("authorization", "old-token-1b2c3d4e5f")],
                         [("authorization", "Basic old-token-1b2c3d4e5f")]):
            with pytest.raises(grpc.RpcError) as refused:
                delete(stub_, "chair", metadata=metadata)
            codes.append(refused.value.code())
        with pytest.raises(grpc.RpcError) as reflection_refused:
            list_services(channel)
    assert set(codes) == {grpc.StatusCode.UNAUTHENTICATED}
    assert reflection_refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert everything(database) == before
    assert "token-" not in caplog.text


def test_every_refused_call_logs_one_line_with_method_status_and_peer_but_no_token(database, service_log):
    tokens = server.load_config(TOKENS).auth_tokens
    with serving(database, auth_tokens=tokens, max_concurrent_rpcs=1) as (stub_, _, _):
        with pytest.raises(grpc.RpcError):
            delete(stub_, "chair", metadata=[("authorization", "Bearer not-the-token-0123456789")])
        unauthenticated = service_log.wait_for("status=UNAUTHENTICATED")
        good = [("authorization", "Bearer old-token-1b2c3d4e5f")]
        with pytest.raises(grpc.RpcError):
            delete_batch(stub_, ["m"] * 1001, metadata=good)
        too_many = service_log.wait_for("status=INVALID_ARGUMENT")
    for record in (unauthenticated, too_many):
        assert record.levelname == "WARNING" and "peer=ipv4:127.0.0.1:" in record.getMessage()
        assert "request_id=" in record.getMessage()
    assert unauthenticated.getMessage().startswith("DeleteImageByModelId status=UNAUTHENTICATED")
    assert too_many.getMessage().startswith("DeleteImagesByModelIds status=INVALID_ARGUMENT")
    assert "models=1001 ids='m','m','m','m','m',...(+996)" in too_many.getMessage()
    assert not any("token" in r.getMessage() for r in service_log.records)


def test_a_shed_call_logs_one_line(wire, service_log):
    with serving_on(wire.client(timeout_ms=30_000), mongo_timeout_s=30, max_concurrent_rpcs=1) as (stub_, _, _):
        wire.hang()
        held = stub_.DeleteImageByModelId.future(pb2.DeleteImageRequest(model_id="held"), timeout=30)
        assert wire.arrivals.acquire(timeout=10)
        with pytest.raises(grpc.RpcError):
            delete(stub_, "shed")
        record = service_log.wait_for("status=RESOURCE_EXHAUSTED")
        wire.recover()
        held.result()
    assert record.getMessage().startswith("DeleteImageByModelId status=RESOURCE_EXHAUSTED")
    assert "model_id='shed'" in record.getMessage() and "peer=" in record.getMessage()


def test_every_listed_token_is_accepted_so_tokens_can_be_rotated(database):
    upload(database, "chair")
    upload(database, "table")
    tokens = server.load_config(TOKENS).auth_tokens
    with serving(database, auth_tokens=tokens) as (stub_, _, channel):
        old = delete(stub_, "chair", metadata=[("authorization", "Bearer old-token-1b2c3d4e5f")])
        new = delete(stub_, "table", metadata=[("authorization", "Bearer new-token-9f8e7d6c5b")])
        services = list_services(channel, metadata=[("authorization", "Bearer new-token-9f8e7d6c5b")])
    assert (old.deleted_images, new.deleted_images) == (1, 1)
    assert "image_service.ImageService" in services


def test_health_needs_no_token(database):
    with serving(database, auth_tokens=("secret-token",)) as (_, _, channel):
        updates = watch_health(channel)
        assert wait_for_status(updates, SERVING)
        updates.cancel()
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert reply.status == SERVING


def test_the_client_speaks_tls_mtls_and_tokens_and_checks_health(database, certificates, capsys):
    upload(database, "chair")
    settings_ = {**tls_settings(certificates, mutual=True), "auth_tokens": ("token-a-0123456789",)}
    with serving(database, **settings_) as (_, running, _):
        tls = ["--address", f"127.0.0.1:{running.port}", "--tls-ca", certificates["ca"],
               "--tls-cert", certificates["client_cert"], "--tls-key", certificates["client_key"]]
        running.run(running.running.monitor.check())  # the first ping has answered
        health_code = client_cli.main(["health", *tls])
        refused_code = client_cli.main(["chair", *tls])
        deleted_code = client_cli.main(["chair", *tls, "--token", "token-a-0123456789", "--timeout", "5"])
    out, err = capsys.readouterr()
    assert (health_code, refused_code, deleted_code) == (0, 3, 0)
    assert out.splitlines()[0] == "SERVING"
    assert "call failed: UNAUTHENTICATED" in err
    assert out.splitlines()[1].startswith("chair\tok\tOUTCOME_DELETED")


# ---------------------------------------------------------------------------
# Logs
# ---------------------------------------------------------------------------


@pytest.fixture
def root_logging():
    """Puts the root logger back as it was after configure_logging."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_json_logs_are_one_object_per_line(root_logging, tmp_path):
    config = server.load_config({"LOG_FORMAT": "json"})
    with open(tmp_path / "log", "w+") as stream:
        server.configure_logging(config, stream)
        server.log.info("DeleteImageByModelId model_id=%r", 'a"b')
        stream.seek(0)
        (line,) = stream.read().splitlines()
    entry = json.loads(line)
    assert (entry["level"], entry["logger"], entry["message"]) == ("INFO", "image_service",
                                                                   "DeleteImageByModelId model_id='a\"b'")


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_passwords_and_tokens_never_reach_the_log(root_logging, tmp_path, log_format):
    config = server.load_config({"MONGO_USER": "svc", "MONGO_PASSWORD": 'p@ss"word-0123456789',
                                 "LOG_FORMAT": log_format,
                                 "GRPC_AUTH_TOKEN": "tok-1-0123456789ab,tok-2-0123456789ab"})
    with open(tmp_path / "log", "w+") as stream:
        server.configure_logging(config, stream)
        try:
            raise RuntimeError(f"auth failed for {config.mongo_uri} with tok-2-0123456789ab")
        except RuntimeError:
            server.log.exception("failure: %s", 'p@ss"word-0123456789')
        stream.seek(0)
        text = stream.read()
    assert "failure" in text
    for secret in ("p@ss", "p%40ss", "tok-1-0123456789ab", "tok-2-0123456789ab"):
        assert secret not in text


# ---------------------------------------------------------------------------
# Request ids and dry runs
# ---------------------------------------------------------------------------


def test_the_callers_request_id_is_returned_and_logged(database, stub, service_log):
    reply, call = stub.DeleteImageByModelId.with_call(
        pb2.DeleteImageRequest(model_id="chair"), timeout=10, metadata=[("x-request-id", "catalog-42")])
    assert dict(call.trailing_metadata())["x-request-id"] == "catalog-42"
    record = service_log.wait_for("request_id=catalog-42")
    assert record.getMessage().startswith("DeleteImageByModelId status=OK request_id=catalog-42 peer=")


def test_without_a_request_id_one_is_made_up_and_a_hostile_one_is_cleaned_and_bounded(database, stub):
    _, plain = stub.DeleteImageByModelId.with_call(pb2.DeleteImageRequest(model_id="chair"), timeout=10)
    _, hostile = stub.DeleteImageByModelId.with_call(
        pb2.DeleteImageRequest(model_id="chair"), timeout=10,
        metadata=[("x-request-id", "evil id=1 peer=x;" + "a" * 500)])
    assert re.fullmatch(r"[0-9a-f]{32}", dict(plain.trailing_metadata())["x-request-id"])
    assert dict(hostile.trailing_metadata())["x-request-id"] == ("evilid1peerx" + "a" * 500)[:64]


def test_the_client_sends_and_prints_a_request_id(database, capsys):
    with serving(database) as (_, running, _):
        code = client_cli.main(["chair", "--address", f"127.0.0.1:{running.port}", "--request-id", "ops-7"])
    assert code == 0
    assert "request_id=ops-7" in capsys.readouterr().err


def test_a_dry_run_says_what_would_be_deleted_and_changes_nothing(database, stub):
    upload(database, "chair")
    upload(database, "chair", data=b"jpeg")
    before = everything(database)
    reply = stub.DeleteImageByModelId(pb2.DeleteImageRequest(model_id="chair", validate_only=True), timeout=10)
    assert everything(database) == before
    assert (reply.success, reply.outcome) == (True, pb2.OUTCOME_DELETED)
    assert (reply.deleted_images, reply.deleted_files, reply.file_bytes) == (2, 2, len(IMAGE) + 4)
    assert reply.message.startswith("would delete 2 images and 2 files")


def test_a_dry_run_batch_answers_per_model_and_changes_nothing(database, stub):
    upload(database, "chair")
    gone = upload(database, "table")
    database["fs.files"].delete_one({"_id": gone})
    before = everything(database)
    request = pb2.DeleteImagesRequest(model_ids=["chair", "table", "sofa"], validate_only=True)
    chair, table, sofa = stub.DeleteImagesByModelIds(request, timeout=10).results
    assert everything(database) == before
    assert [(r.deleted_images, r.deleted_files, r.file_bytes) for r in (chair, table, sofa)] == [
        (1, 1, len(IMAGE)), (1, 0, 0), (0, 0, 0)]
    assert sofa.outcome == pb2.OUTCOME_NOTHING_TO_DELETE
    assert all(r.message.startswith("would delete") for r in (chair, table, sofa))


def test_a_dry_run_sends_no_write_command(wire):
    for model_id in ("chair", "table"):
        upload(wire.db, model_id)
    with serving_on(wire.client()) as (stub_, _, _):
        stub_.DeleteImageByModelId(pb2.DeleteImageRequest(model_id="chair", validate_only=True), timeout=10)
        stub_.DeleteImagesByModelIds(pb2.DeleteImagesRequest(model_ids=["chair", "table"], validate_only=True),
                                     timeout=10)
    assert wire.names() == ["find", "find", "find", "find"]


def test_the_client_can_ask_for_a_dry_run(database, capsys):
    upload(database, "chair")
    with serving(database) as (_, running, _):
        code = client_cli.main(["chair", "--address", f"127.0.0.1:{running.port}", "--dry-run"])
    assert code == 0 and len(images_of(database, "chair")) == 1
    assert "would delete 1 image and 1 file" in capsys.readouterr().out


# ---------------------------------------------------------------------------
# Metrics and indexes
# ---------------------------------------------------------------------------


def scrape(port):
    """The /metrics page, as text and as {(name, labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as page:
        text = page.read().decode()
    samples = {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
               for family in text_string_to_metric_families(text) for sample in family.samples}
    return text, samples


def test_metrics_count_exactly_what_deletes_removed_and_name_no_model(database):
    upload(database, "secret-chair-model")
    upload(database, "secret-chair-model")
    with serving(database, metrics_port=0, metrics_host="127.0.0.1") as (stub_, running, channel):
        delete(stub_, "secret-chair-model")
        delete(stub_, "secret-chair-model")
        delete(stub_, "")
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        text, samples = scrape(running.running.metrics_port)
    method = "image_service.ImageService/DeleteImageByModelId"
    assert samples["image_service_images_deleted_total", ()] == 2
    assert samples["image_service_files_deleted_total", ()] == 2
    for outcome in ("OUTCOME_DELETED", "OUTCOME_NOTHING_TO_DELETE", "OUTCOME_INVALID_ARGUMENT"):
        assert samples["image_service_deletions_total", (("outcome", outcome),)] == 1
    assert samples["grpc_server_call_duration_seconds_count", (("grpc_method", method), ("grpc_status", "OK"))] == 3
    assert samples["grpc_server_call_duration_seconds_count",
                   (("grpc_method", "grpc.health.v1.Health/Check"), ("grpc_status", "OK"))] == 1
    assert samples["image_service_mongodb_up", ()] == 1
    assert samples["image_service_calls_in_flight", ()] == 0
    assert "secret-chair" not in text and "127.0.0.1" not in text


def test_a_dry_run_moves_no_deletion_counter(database):
    upload(database, "chair")
    with serving(database, metrics_port=0, metrics_host="127.0.0.1") as (stub_, running, _):
        stub_.DeleteImageByModelId(pb2.DeleteImageRequest(model_id="chair", validate_only=True), timeout=10)
        _, samples = scrape(running.running.metrics_port)
    assert samples["image_service_images_deleted_total", ()] == 0
    assert not any(name == "image_service_deletions_total" for name, _ in samples)


def test_mongodb_commands_are_timed_from_the_drivers_own_monitoring(wire):
    upload(wire.db, "chair")
    metrics = server.Metrics()
    client = pymongo.MongoClient(wire.uri, event_listeners=[server.CommandTimer(metrics.mongodb_command_duration)])
    with serving_on(client, metrics=metrics, metrics_port=0, metrics_host="127.0.0.1") as (stub_, running, _):
        delete(stub_, "chair")
        _, samples = scrape(running.running.metrics_port)
    assert samples["image_service_mongodb_command_duration_seconds_count", (("command", "find"),)] == 1
    assert samples["image_service_mongodb_command_duration_seconds_count", (("command", "delete"),)] == 3


def test_missing_indexes_are_warned_about_once_mongodb_answers(database, service_log):
    with serving(database):
        warnings = [r.getMessage() for r in service_log.records if r.getMessage().startswith("index missing")]
    assert len(warnings) == 2
    assert warnings[0].startswith("index missing on images {model_id: 1}: every delete scans")
    assert warnings[1].startswith("index missing on fs.chunks {files_id: 1, n: 1}")
    assert all("--create-indexes" in warning for warning in warnings)


def test_create_indexes_creates_both_and_can_be_run_again(tmp_path, wire):
    for _ in range(2):
        done = run_server_process({"MONGO_URI": wire.uri}, "--create-indexes", cwd=tmp_path)
        assert done.returncode == 0, done.stderr
    assert server.missing_indexes(wire.db) == []
    assert wire.db["fs.chunks"].index_information()["files_id_1_n_1"]["unique"]


def test_create_indexes_without_mongodb_says_so_in_one_line_and_exits_1(tmp_path):
    done = run_server_process({"MONGO_URI": f"mongodb://127.0.0.1:{closed_port()}/", "MONGO_TIMEOUT_MS": "300"},
                              "--create-indexes", cwd=tmp_path)
    assert done.returncode == 1
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("cannot create the indexes: ServerSelectionTimeoutError")


UNIT = os.path.join(HERE, "deploy", "image-service.service")


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze is not installed: install systemd to check the unit's sandbox")
def test_the_systemd_unit_is_sandboxed_and_verifies():
    security = subprocess.run(["systemd-analyze", "security", "--offline=true", UNIT],
                              capture_output=True, text=True, timeout=60)
    score = re.search(r"Overall exposure level for image-service.service: ([0-9.]+)", security.stdout)
    assert score and float(score.group(1)) <= 2.0, security.stdout[-500:]
    verify = subprocess.run(["systemd-analyze", "verify", UNIT], capture_output=True, text=True, timeout=60)
    assert (verify.stdout + verify.stderr).strip().splitlines() == [
        "image-service.service: Command /opt/image-service/.venv/bin/python3 is not executable:"
        " No such file or directory"]


def test_the_systemd_unit_waits_longer_than_the_drain():
    with open(UNIT) as unit:
        settings_ = dict(line.strip().split("=", 1) for line in unit if re.match(r"^[A-Za-z]+=", line))
    default = server.load_config({})
    assert float(settings_["TimeoutStopSec"]) >= default.shutdown_delay_s + default.shutdown_grace_s + 5
    assert settings_["EnvironmentFile"] == "/etc/image-service/env" and settings_["Restart"] == "on-failure"


# ---------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------


def delete_batch(stub_, model_ids, timeout=10, **kwargs):
    request = pb2.DeleteImagesRequest(model_ids=model_ids)
    return stub_.DeleteImagesByModelIds(request, timeout=timeout, **kwargs).results


def test_a_batch_answers_one_result_per_id_in_request_order(database, stub):
    upload(database, "chair")
    upload(database, "table")
    upload(database, "table")
    upload(database, "lamp")

    results = delete_batch(stub, ["table", "sofa", "chair"])

    assert [r.model_id for r in results] == ["table", "sofa", "chair"]
    assert [(r.success, r.outcome, r.deleted_images, r.deleted_files) for r in results] == [
        (True, pb2.OUTCOME_DELETED, 2, 2), (True, pb2.OUTCOME_NOTHING_TO_DELETE, 0, 0),
        (True, pb2.OUTCOME_DELETED, 1, 1)]
    assert [d["model_id"] for d in database.images.find()] == ["lamp"]
    assert_store_consistent(database)


def test_an_invalid_id_in_a_batch_fails_alone(database, stub):
    upload(database, "chair")
    results = delete_batch(stub, ["", "chair", "x" * 300])
    assert [r.outcome for r in results] == [
        pb2.OUTCOME_INVALID_ARGUMENT, pb2.OUTCOME_DELETED, pb2.OUTCOME_INVALID_ARGUMENT]
    assert (results[0].message, results[2].message) == ("model_id is empty", "model_id is longer than 256 characters")
    assert images_of(database, "chair") == []


def test_duplicate_ids_in_a_batch_each_get_the_same_result(database, stub):
    upload(database, "chair")
    upload(database, "chair")
    first, second = delete_batch(stub, ["chair", "chair"])
    assert first == second
    assert (first.deleted_images, first.deleted_files) == (2, 2)


def test_an_empty_batch_answers_no_results(database, stub):
    assert list(delete_batch(stub, [])) == []


def test_a_batch_of_1000_is_accepted_and_1001_is_invalid_argument(database, stub):
    upload(database, "model-999")
    results = delete_batch(stub, [f"model-{i}" for i in range(1000)])
    with pytest.raises(grpc.RpcError) as refused:
        delete_batch(stub, [f"model-{i}" for i in range(1001)])
    assert len(results) == 1000 and results[999].deleted_images == 1
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.value.details() == "at most 1000 model ids per call, got 1001"


def test_a_batch_shares_out_what_was_removed_when_files_were_already_gone(database, stub):
    gone = upload(database, "chair")
    upload(database, "table")
    database["fs.files"].delete_one({"_id": gone})
    chair, table = delete_batch(stub, ["chair", "table"])
    assert (chair.deleted_images, table.deleted_images) == (1, 1)
    assert chair.deleted_files + table.deleted_files == 1  # what the database removed, shared out
    assert all("counts shared out within the batch" in result.message for result in (chair, table))
    assert everything(database) == {"images": [], "fs.files": [], "fs.chunks": []}


@pytest.mark.parametrize("models", [40, 1000])
def test_a_batch_costs_four_commands_whatever_its_size(wire, models):
    for i in range(models):
        upload(wire.db, f"model-{i}", data=b"jpeg")
        upload(wire.db, f"model-{i}", data=b"jpeg")
    with serving_on(wire.client(), mongo_timeout_s=60) as (stub_, _, _):
        results = delete_batch(stub_, [f"model-{i}" for i in range(models)], timeout=60)
    assert {(r.deleted_images, r.deleted_files) for r in results} == {(2, 2)}
    assert wire.names() == ["find", "delete", "delete", "delete"]
    assert everything(wire.db) == {"images": [], "fs.files": [], "fs.chunks": []}


def test_the_client_sends_several_ids_as_one_batch(wire, capsys):
    upload(wire.db, "chair")
    upload(wire.db, "table")
    with serving_on(wire.client()) as (_, running, _):
        code = client_cli.main(["chair", "table", "sofa", "--address", f"127.0.0.1:{running.port}"])
    assert code == 0 and len(capsys.readouterr().out.splitlines()) == 3
    assert wire.names() == ["find", "delete", "delete", "delete"]


# ---------------------------------------------------------------------------
# Under faults: what a failure at any point leaves
# ---------------------------------------------------------------------------


def leftovers(db, model_id):
    """Anything of the model's still stored: metadata, or files by name."""
    return images_of(db, model_id) + list(db["fs.files"].find({"filename": f"{model_id}.jpg"}))


@pytest.mark.parametrize("fault", ["error", "drop-before", "drop-after"])
@pytest.mark.parametrize("command", [1, 2, 3, 4], ids=["find", "delete-files", "delete-chunks", "delete-metadata"])
def test_a_failure_at_any_command_leaves_a_state_the_next_call_completes(wire, command, fault):
    for _ in range(3):
        upload(wire.db, "chair")
    upload(wire.db, "table")
    bystander = model_data(wire.db, "table")
    wire.faults[command] = fault

    with serving_on(wire.client()) as (stub_, _, _):
        first = delete(stub_, "chair")
        assert command not in wire.faults, "the fault was not reached"
        if first.success:
            assert leftovers(wire.db, "chair") == []
        else:
            assert first.outcome in (pb2.OUTCOME_UNAVAILABLE, pb2.OUTCOME_INTERNAL)
        second = delete(stub_, "chair")

    assert second.success
    assert leftovers(wire.db, "chair") == []
    assert_store_consistent(wire.db)
    assert model_data(wire.db, "table") == bystander


def test_a_server_killed_mid_delete_leaves_a_state_the_restarted_server_completes(tmp_path, wire):
    for _ in range(3):
        upload(wire.db, "chair")
    upload(wire.db, "table")
    bystander = model_data(wire.db, "table")
    reached, killed = threading.Event(), threading.Event()
    wire.faults[3] = lambda: (reached.set(), killed.wait(20))  # hold the chunks delete
    first = ServerProcess(tmp_path, {"MONGO_URI": wire.uri})
    in_flight = first.stub.DeleteImageByModelId.future(pb2.DeleteImageRequest(model_id="chair"), timeout=20)
    assert reached.wait(10)

    first.process.kill()
    first.process.wait(timeout=10)
    killed.set()  # the database had the command: it completes without its caller
    with pytest.raises(grpc.RpcError):
        in_flight.result()
    second = ServerProcess(tmp_path, {"MONGO_URI": wire.uri})
    reply = second.stub.DeleteImageByModelId(pb2.DeleteImageRequest(model_id="chair"), timeout=10)
    assert second.stop() == 0

    assert (reply.success, reply.deleted_images) == (True, 3)
    assert "3 references to a file already gone" in reply.message
    assert leftovers(wire.db, "chair") == []
    assert_store_consistent(wire.db)
    assert model_data(wire.db, "table") == bystander


# ---------------------------------------------------------------------------
# Under arbitrary input
# ---------------------------------------------------------------------------

QUERY_LOOK_ALIKES = ['{"$ne": null}', '{"$gt": ""}', "$ne", "$where", ".*", "^", "/.*/", "*", "", " "]


def look_alikes(model_id):
    """Ids that a sloppy match would confuse with ``model_id``."""
    return {model_id, model_id.strip(), f" {model_id}", f"{model_id} ", f"{model_id}\t", model_id.upper(),
            model_id.lower(), model_id.casefold(), f"^{model_id}$", f"{model_id}.*", f"{model_id}\u00a0",
            *QUERY_LOOK_ALIKES}


@settings(max_examples=300, deadline=None, derandomize=True)
@given(model_id=st.one_of(st.text(max_size=40), st.sampled_from(QUERY_LOOK_ALIKES),
                          st.builds(lambda oid: str(oid), st.builds(ObjectId))))
def test_only_exact_matches_are_ever_deleted(model_id):
    db = mongomock.MongoClient().db
    stored = look_alikes(model_id)
    for candidate in stored:
        upload(db, candidate, data=b"jpeg")

    (reply,) = server.delete_and_describe(db, [model_id], deadline=time.monotonic() + 5)

    remaining = sorted(d["model_id"] for d in db.images.find())
    if reply.outcome == pb2.OUTCOME_INVALID_ARGUMENT:
        assert remaining == sorted(stored)
    else:
        assert reply.deleted_images == 1
        assert remaining == sorted(stored - {model_id})


@pytest.fixture(scope="module")
def fuzzed_server():
    db = mongomock.MongoClient().db
    upload(db, "chair")
    with serving(db) as (stub_, _, channel):
        yield db, stub_, channel


@settings(max_examples=300, deadline=None, derandomize=True)
@given(method=st.sampled_from(["DeleteImageByModelId", "DeleteImagesByModelIds"]), body=st.binary(max_size=300))
def test_random_bytes_as_a_request_never_crash_the_server(fuzzed_server, method, body):
    db, stub_, channel = fuzzed_server
    raw_call = channel.unary_unary(f"/image_service.ImageService/{method}")
    try:
        raw_call(body, timeout=5)
    except grpc.RpcError as error:  # A body that is no request is refused as such.
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert delete(stub_, "no-such-model").outcome == pb2.OUTCOME_NOTHING_TO_DELETE
    assert len(images_of(db, "chair")) == 1


# ---------------------------------------------------------------------------
# Under load (the short form of load_image_service.py)
# ---------------------------------------------------------------------------


def test_thousands_of_concurrent_deletes_succeed_or_are_shed_and_memory_stays_flat():
    import load_image_service as load

    running, model_ids = load.start_in_memory(models=300, images=2, max_concurrent_rpcs=100)
    try:
        report = load.run_load(f"127.0.0.1:{running.port}", model_ids, calls=3000, concurrency=32,
                               max_seconds=60, warm_up_calls=1000)
    finally:
        running.stop(0)
    assert report.calls == 3000
    assert report.errors == 0, report.results
    assert report.results["OK OUTCOME_DELETED"] == 300
    assert report.rss_growth_kib < 16 * 1024, f"resident memory grew {report.rss_growth_kib} KiB"


# ---------------------------------------------------------------------------
# Maintenance: the orphan report and sweep
# ---------------------------------------------------------------------------


def old_service_leftovers(db):
    """A store as the old service left it, beside healthy models.

    The old service removed a model's first image only, and did so in steps
    that could stop half-way: a file document removed with its chunks left
    behind and its metadata still pointing at it; metadata removed with its
    file left behind.
    """
    upload(db, "chair")
    upload(db, "chair")
    half_deleted = upload(db, "table")
    upload(db, "table")
    db["fs.files"].delete_one({"_id": half_deleted})
    unreferenced = upload(db, "lamp")
    db.images.delete_one({"image_id": str(unreferenced)})
    (dangling,) = db.images.find({"image_id": str(half_deleted)})
    invalid = db.images.insert_one({"name": "sofa.jpg", "image_id": "not-an-id", "model_id": "sofa"}).inserted_id
    return {"chunks": [half_deleted], "files": [unreferenced], "metadata": {dangling["_id"], invalid}}


def a_second_later():
    return datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=1)


def test_the_orphan_report_finds_each_kind_of_leftover():
    db = mongomock.MongoClient().db
    expected = old_service_leftovers(db)
    report = server.find_orphans(db, min_age_s=0, now=a_second_later())
    assert report.chunk_file_ids == expected["chunks"]
    assert report.unreferenced_file_ids == expected["files"]
    assert set(report.dangling_metadata_ids) == expected["metadata"]


def test_files_and_chunks_younger_than_the_minimum_age_are_not_reported():
    db = mongomock.MongoClient().db
    old_service_leftovers(db)
    report = server.find_orphans(db, min_age_s=3600)
    assert (report.chunk_file_ids, report.unreferenced_file_ids) == ([], [])


def sweep(db, *flags, now=None):
    args = server.parse_arguments(["--sweep-orphans", "--min-age-s", "0", *flags])
    out = io.StringIO()
    server.run_sweep(db, args, out=out, now=now or a_second_later())
    return out.getvalue()


def test_the_sweep_changes_nothing_without_apply():
    db = mongomock.MongoClient().db
    old_service_leftovers(db)
    before = everything(db)
    output = sweep(db)
    assert everything(db) == before
    assert "1  chunks without a file" in output and "report only: nothing changed" in output


def test_apply_removes_orphan_chunks_and_dangling_metadata_but_keeps_files():
    db = mongomock.MongoClient().db
    expected = old_service_leftovers(db)
    healthy = model_data(db, "chair")
    output = sweep(db, "--apply")
    assert db["fs.chunks"].count_documents({"files_id": expected["chunks"][0]}) == 0
    assert db.images.count_documents({"_id": {"$in": list(expected["metadata"])}}) == 0
    assert db["fs.files"].count_documents({"_id": expected["files"][0]}) == 1
    assert model_data(db, "chair") == healthy and len(images_of(db, "table")) == 1
    assert "removed 2 chunks, 2 images documents, 0 files" in output


def test_apply_files_removes_unreferenced_files_too_and_leaves_a_consistent_store():
    db = mongomock.MongoClient().db
    old_service_leftovers(db)
    healthy = model_data(db, "chair")
    sweep(db, "--apply", "--apply-files")
    assert_store_consistent(db)
    assert model_data(db, "chair") == healthy and len(images_of(db, "table")) == 1


def test_apply_files_keeps_a_file_referenced_since_the_scan():
    db = mongomock.MongoClient().db
    expected = old_service_leftovers(db)
    report = server.find_orphans(db, min_age_s=0, now=a_second_later())
    db.images.insert_one({"name": "lamp.jpg", "image_id": expected["files"][0], "model_id": "lamp"})
    removed = server.sweep_orphans(db, report, apply_files=True, batch_size=10)
    assert removed["files"] == 0
    assert db["fs.files"].count_documents({"_id": expected["files"][0]}) == 1


def test_the_sweep_reads_image_ids_as_the_delete_does():
    db = mongomock.MongoClient().db
    padded, upper = upload(db, "chair"), upload(db, "table")
    db.images.update_one({"model_id": "chair"}, {"$set": {"image_id": f" {padded} "}})
    db.images.update_one({"model_id": "table"}, {"$set": {"image_id": str(upper).upper()}})
    report = server.find_orphans(db, min_age_s=0, now=a_second_later())
    assert report == server.OrphanReport([], [], [])
    (reply,) = server.delete_and_describe(db, ["chair"], deadline=time.monotonic() + 5)
    assert (reply.deleted_images, reply.deleted_files) == (1, 1)


def test_apply_files_keeps_a_file_referenced_since_the_scan_in_an_odd_spelling():
    db = mongomock.MongoClient().db
    expected = old_service_leftovers(db)
    report = server.find_orphans(db, min_age_s=0, now=a_second_later())
    (file_id,) = expected["files"]
    db.images.insert_one({"name": "lamp.jpg", "image_id": f" {str(file_id).upper()}", "model_id": "lamp"})
    removed = server.sweep_orphans(db, report, apply_files=True, batch_size=10)
    assert removed["files"] == 0
    assert db["fs.files"].count_documents({"_id": file_id}) == 1


def test_the_sweep_deletes_in_batches_of_the_given_size(wire):
    for number in range(5):
        gone = upload(wire.db, f"model-{number}")
        wire.db["fs.files"].delete_one({"_id": gone})
    with wire.client() as mongo:
        sweep(mongo["CatalogServiceDB"], "--apply", "--batch-size", "2")
    deletes = [c for c in wire.commands if "delete" in c]  # 5 orphan chunk sets, 5 dangling metadata
    sizes = [len(next(iter(c["deletes"][0]["q"].values()))["$in"]) for c in deletes]
    assert sizes == [2, 2, 1, 2, 2, 1]
    assert everything(wire.db) == {"images": [], "fs.files": [], "fs.chunks": []}


def test_the_sweep_runs_from_the_command_line(tmp_path, wire):
    expected = old_service_leftovers(wire.db)
    done = run_server_process({"MONGO_URI": wire.uri}, "--sweep-orphans", "--min-age-s", "0", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    chunks, files, metadata, verdict = done.stdout.splitlines()
    assert chunks == f"       1  chunks without a file (by files_id): {expected['chunks'][0]}"
    assert files == f"       1  files no images document references: {expected['files'][0]}"
    assert metadata.startswith("       2  images documents whose file is gone: ")
    assert verdict.startswith("report only: nothing changed")


def test_a_sweep_that_cannot_reach_mongodb_says_so_and_exits_1(tmp_path):
    env = {"MONGO_URI": f"mongodb://127.0.0.1:{closed_port()}/", "MONGO_TIMEOUT_MS": "300"}
    done = run_server_process(env, "--sweep-orphans", "--apply", cwd=tmp_path)
    assert done.returncode == 1
    assert "sweep failed, nothing more was changed: ServerSelectionTimeoutError" in done.stderr
    assert "Traceback" not in done.stderr
