"""What the tests build with: data shaped as the upload service writes it, the
service on an ephemeral port, the server as a child process, and small
helpers to call it."""

import contextlib
import dataclasses
import datetime
import io
import logging
import os
import signal
import subprocess
import sys
import threading
import time

import grpc
import mongomock
import pymongo
import pymongo.database
import pymongo.errors
import pytest
import uvloop
from bson import ObjectId

import image_service_pb2 as pb2
import image_service_pb2_grpc as pb2_grpc
import image_service_server as server
import image_service_settings as service_settings
import image_service_store as store
import image_service_sweep as orphan_sweep
from image_service_background import BackgroundServer
from image_service_observability import Metrics
from image_service_replies import RequestedModels
from mongo_standins import closed_port

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout


SERVER_SCRIPT = os.path.join(HERE, "image_service_server.py")


IMAGE = bytes(range(256)) * 1200  # 300 KiB: two GridFS chunks


def upload(db, model_id, data=IMAGE):
    """One image stored the way the upload service stores it."""
    return store.store_image(db, model_id, data)


def store_under_hex_string_id(db, model_id, upper_case=False):
    """An image whose GridFS file has the hex string (in upper case, if
    asked) as its ``_id``, as some writers store it: GridFS allows any
    ``_id``. Its ``images`` document names it as the upload service does."""
    file_id = str(ObjectId()).upper() if upper_case else str(ObjectId())
    uploaded = datetime.datetime.now(datetime.timezone.utc)
    db["fs.files"].insert_one({"_id": file_id, "filename": f"{model_id}.jpg", "length": 4,
                               "chunkSize": 261120, "uploadDate": uploaded})
    db["fs.chunks"].insert_one({"files_id": file_id, "n": 0, "data": b"jpeg"})
    db.images.insert_one({"name": f"{model_id}.jpg", "image_id": file_id.lower(), "model_id": model_id})
    return file_id


def store_under_exactly(db, model_id, file_id):
    """An image whose GridFS file has ``file_id`` as its ``_id``, exactly as
    its ``images`` document names it: GridFS allows any ``_id``."""
    uploaded = datetime.datetime.now(datetime.timezone.utc)
    db["fs.files"].insert_one({"_id": file_id, "filename": f"{model_id}.jpg", "length": 4,
                               "chunkSize": 261120, "uploadDate": uploaded})
    db["fs.chunks"].insert_one({"files_id": file_id, "n": 0, "data": b"jpeg"})
    db.images.insert_one({"name": f"{model_id}.jpg", "image_id": file_id, "model_id": model_id})


# Ids that are no ObjectId's spelling name the file whose _id is exactly that value.
EXACT_FILE_IDS = {"mixed-case hex": "5F1b2c3d4e5f60718293a4b5", "a name": "chair-front.jpg",
                  "an empty string": "", "an integer": 42}


def store_again_under_its_hex_string(db, file_id):
    """A second copy of a file's ``fs.files`` document, under its hex string,
    as a second writer may store it. FerretDB v1 keeps an ObjectId and its
    hex string as one ``_id``: there, this shape cannot exist, and the test
    says so."""
    try:
        db["fs.files"].insert_one({"_id": str(file_id), "filename": "copy.jpg", "length": 4,
                                   "chunkSize": 261120, "uploadDate": datetime.datetime.now(datetime.UTC)})
    except pymongo.errors.DuplicateKeyError:
        pytest.skip("this server keeps an ObjectId and its hex string as one _id (FerretDB v1): a file"
                    " cannot be stored under both")


def images_of(db, model_id):
    return list(db.images.find({"model_id": model_id}))


def everything(db):
    """The whole image store, comparable before and after."""
    return {name: sorted(db[name].find(), key=lambda d: str(d["_id"]))
            for name in ("images", "fs.files", "fs.chunks")}


def model_data(db, model_id):
    """A model's metadata, files and chunks, to show it was left untouched."""
    metadata = images_of(db, model_id)
    file_ids = [store.referenced_file_id(d["image_id"]) for d in metadata]
    return (metadata, list(db["fs.files"].find({"_id": {"$in": file_ids}})),
            list(db["fs.chunks"].find({"files_id": {"$in": file_ids}})))


def assert_store_consistent(db):
    """No orphan chunks, no unreferenced files, no dangling metadata."""
    file_ids = {f["_id"] for f in db["fs.files"].find()}
    referenced = {store.referenced_file_id(d.get("image_id")) for d in db.images.find()}
    chunk_owners = {c["files_id"] for c in db["fs.chunks"].find()}
    assert chunk_owners <= file_ids, "chunks without a file"
    assert file_ids <= referenced, "files no images document references"
    assert referenced <= file_ids, "images documents whose file is gone"


TEST_CONFIG = service_settings.Config(
    mongo_uri="mongodb://127.0.0.1:1/", grpc_host="127.0.0.1", grpc_port=0,
    mongo_timeout_s=2.0, health_interval_s=0.1)


def served_database(db):
    """The database the server is given for a test's ``db``: a mongomock
    one behind the in-memory stand-in, as ``--in-memory`` serves it; the real
    MongoDB of TEST_MONGO_URI through pymongo's asyncio client; an
    AsyncDatabase as it is."""
    if isinstance(db, mongomock.Database):
        return store.InMemoryDatabase(db)
    if isinstance(db, pymongo.database.Database):
        return pymongo.AsyncMongoClient(os.environ["TEST_MONGO_URI"])[db.name]
    return db


def empty_real_database():
    """An empty database on the real MongoDB (or FerretDB) of TEST_MONGO_URI,
    dropped after; the test is skipped, saying why, when none is set."""
    uri = os.environ.get("TEST_MONGO_URI")
    if not uri:
        pytest.skip("TEST_MONGO_URI is not set: set it to a MongoDB URI to run this test on a real server"
                    " (scripts/with-ferretdb does, with a FerretDB)")
    client = pymongo.MongoClient(uri, serverSelectionTimeoutMS=5000)
    name = f"image_service_test_{ObjectId()}"
    try:
        yield client[name]
    finally:
        client.drop_database(name)
        client.close()


def delete_directly(db, model_ids, seconds=5, **options):
    """The deletion itself, without the server, on its own event loop."""
    return delete_before(db, model_ids, time.monotonic() + seconds, **options)


def delete_before(db, model_ids, deadline, **options):
    """The deletion itself, before ``deadline`` on the deletion's clock."""
    requested = RequestedModels(model_ids)
    return uvloop.run(server.delete_and_describe(served_database(db), requested, deadline, **options))


@contextlib.contextmanager
def serving(db, metrics=None, tracing=None, round_size=server.ROUND_SIZE, **settings_):
    """The service on an ephemeral port, deleting in rounds of ``round_size``, and a stub for it."""
    db = served_database(db)
    config = dataclasses.replace(TEST_CONFIG, **settings_)
    metrics = metrics or Metrics()
    servicer = server.ImageServiceServicer(db, config.mongo_timeout_s, config.max_concurrent_deletions,
                                           metrics, round_size)
    running = BackgroundServer(server.start_server(config, db, servicer, metrics, tracing))
    # The first ping (and index check) have passed before the test goes on.
    running.run(running.running.monitor.first_check_done.wait(), timeout_s=10)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            yield pb2_grpc.ImageServiceStub(channel), running, channel
    finally:
        # A test that stopped the server itself has ended its loop and cancelled
        # the client's tasks with it: nothing is left to close on it.
        if isinstance(db.client, pymongo.AsyncMongoClient) and not running.stopped:
            running.run(db.client.close(), timeout_s=10)
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
            assert self._arrived.wait_for(lambda: any(text in r.getMessage() for r in self.records),
                                          timeout), text
            return next(r for r in self.records if text in r.getMessage())


def delete(stub_, model_id, **kwargs):
    return stub_.DeleteImageByModelId(pb2.DeleteImageRequest(model_id=model_id), timeout=10, **kwargs)


@contextlib.contextmanager
def serving_on(mongo_client, metrics=None, tracing=None, **settings_):
    """The service on a pymongo AsyncMongoClient (closed after), and a stub for it."""
    with serving(mongo_client["CatalogServiceDB"], metrics, tracing, **settings_) as served:
        yield served


def run_server_process(env_overrides, *args, cwd=None, timeout=20):
    env = {**os.environ, **env_overrides}
    return subprocess.run([sys.executable, SERVER_SCRIPT, *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


class ServerProcess:
    """``python3 image_service_server.py`` in a child process on a free port
    (with ``credentials``, a channel to it that speaks TLS)."""

    def __init__(self, tmp_path, env_overrides=(), *args, credentials=None):
        self.port = closed_port()
        env = {**os.environ, "GRPC_HOST": "127.0.0.1", "GRPC_PORT": str(self.port), **dict(env_overrides)}
        self.stderr_path = tmp_path / f"server-{self.port}.log"
        with open(self.stderr_path, "w") as stderr:
            self.process = subprocess.Popen([sys.executable, SERVER_SCRIPT, *args], env=env, cwd=tmp_path,
                                            stdout=subprocess.DEVNULL, stderr=stderr)
        self.address = f"127.0.0.1:{self.port}"
        if credentials is None:
            self.channel = grpc.insecure_channel(self.address)
        else:
            self.channel = grpc.secure_channel(self.address, credentials)
        grpc.channel_ready_future(self.channel).result(timeout=20)
        self.stub = pb2_grpc.ImageServiceStub(self.channel)

    def log(self):
        return self.stderr_path.read_text()

    def stop(self, signum=signal.SIGTERM):
        self.process.send_signal(signum)
        code = self.process.wait(timeout=20)
        self.channel.close()
        return code


class FerretDB:
    """A FerretDB process of a test's own (the binary scripts/with-ferretdb
    built), on a free loopback port, storing in SQLite under ``folder``: it
    can be stopped and started again, on the same port and data."""

    def __init__(self, binary, folder):
        self.binary = binary
        self.folder = folder
        self.port = closed_port()
        self.uri = f"mongodb://127.0.0.1:{self.port}/"
        (folder / "data").mkdir()
        self.process = None
        self.start()

    def start(self):
        self.process = subprocess.Popen(
            [self.binary, "--handler=sqlite", f"--sqlite-url=file:{self.folder}/data/",
             f"--state-dir={self.folder}", f"--listen-addr=127.0.0.1:{self.port}", "--debug-addr=-",
             "--telemetry=disable", "--log-level=warn"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # Server selection waits, bounded, until FerretDB accepts connections.
        with pymongo.MongoClient(self.uri, serverSelectionTimeoutMS=20_000) as client:
            client.admin.command("ping")

    def stop(self):
        self.process.terminate()
        self.process.wait(timeout=20)


def delete_batch(stub_, model_ids, timeout=10, **kwargs):
    request = pb2.DeleteImagesRequest(model_ids=model_ids)
    return stub_.DeleteImagesByModelIds(request, timeout=timeout, **kwargs).results


QUERY_LOOK_ALIKES = ['{"$ne": null}', '{"$gt": ""}', "$ne", "$where", ".*", "^", "/.*/", "*", "", " "]


def wait_until(condition, timeout_s=10):
    """Until ``condition()`` holds: the server's own state, looked at as it changes."""
    changed = threading.Event()
    give_up = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < give_up, "the condition never held"
        changed.wait(0.01)


def a_second_later():
    return datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=1)


def sweep(db, *flags, now=None):
    args = server.parse_arguments(["--sweep-orphans", "--min-age-s", "0", *flags])
    out = io.StringIO()
    orphan_sweep.run_sweep(db, args, out=out, now=now or a_second_later())
    return out.getvalue()
