"""MongoDB stand-ins at the wire level, for the real pymongo driver to talk to:
a closed port, a socket that never answers, WireMongo (data in mongomock;
commands counted, held, failed or dropped; mockupdb speaks the protocol) and
SyntheticMongo (a million images synthesised on demand, in a process of its
own, speaking the protocol of ``bench/mongo_wire.py`` as the benchmark's
stand-in does)."""

import asyncio
import contextlib
import gc
import multiprocessing
import socket
import threading
import time

import mongomock
import pymongo
from bson import ObjectId
from mockupdb import MockupDB

import image_service_store as store
from bench import mongo_wire


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


# How a server refuses listCollections to a user without the privilege:
# MongoDB's answer, and Atlas's.
NOT_ALLOWED_TO_LIST_COLLECTIONS = {
    "Unauthorized": (13, "Unauthorized", "not authorized on CatalogServiceDB"),
    "AtlasError": (8000, "AtlasError", "user is not allowed to do action [listCollections]"),
}
# How a server without collations refuses a read naming one (WireMongo's
# unimplemented_code): FerretDB v1, and Amazon DocumentDB before 8.0.
COLLATION_REFUSALS = {"FerretDB": (238, "NotImplemented"), "DocumentDB": (303, "")}


class WireMongo:
    """A MongoDB server at the wire level whose data lives in ``self.db`` (mongomock).

    The real pymongo driver talks to it over a socket. It answers hello, ping,
    find, aggregate, insert and delete; counts the data commands; and can
    fail any of them by number (an error reply, or the connection dropped
    before or after the command took effect), run a hook before one, refuse
    a command by name (``refused``, listIndexes and listCollections
    included) or any command carrying a field (``unimplemented``, answered
    NotImplemented as FerretDB v1 answers ``collation``, or with
    ``unimplemented_code``), or stop answering
    until ``recover()``. listCollections reports the options collections
    were created with (``create_collection``).

    A round's images delete and the read sent with it (which leaves out the
    documents deleted) arrive at once, in either order. WireMongo takes them
    in one order, the same in every run, so that commands are numbered the
    same: the delete first (so that an upload landing during the delete is
    seen by the read), or the read first when ``reads_first`` is set.
    """

    HELLO = mongo_wire.HELLO

    def __init__(self, port=None):
        self.db = mongomock.MongoClient()["CatalogServiceDB"]
        self.commands = []  # every data command received, as sent
        self.faults = {}  # command number (from 1) -> "error" | "drop-before" | "drop-after" | callable
        self.refused = {}  # command name -> (code, codeName, errmsg): every such command gets this error
        self.unimplemented = set()  # fields any command carrying them is refused for, as FerretDB v1 does
        self.unimplemented_code = (238, "NotImplemented")  # Amazon DocumentDB before 8.0: (303, "")
        self.collection_options = {}  # collection name -> its options, as create_collection gave them
        self.answering = threading.Event()
        self.answering.set()
        self.arrivals = threading.Semaphore(0)  # released as each data command arrives
        self.reads_first = False  # take a round's read before its images delete
        self._answered = threading.Condition()
        self._answered_pairs = []  # ("delete" | "read", the _ids it deleted or left out), as answered
        self.unpaired = []  # each of a pair whose partner never came
        # The next images delete by _id leaves out its first this many ids,
        # and says so only in its count: as a multi-delete on a sharded
        # cluster may, racing a chunk migration (SERVER-20361).
        self.deletes_missing = 0
        self._lock = threading.Lock()
        self._mockup = MockupDB(port=port)
        self._mockup.autoresponds(self._handle)
        self.port = self._mockup.run()
        self.uri = f"mongodb://127.0.0.1:{self.port}/?directConnection=true"

    def client(self, timeout_ms=2000):
        return pymongo.MongoClient(self.uri, serverSelectionTimeoutMS=timeout_ms)

    def async_client(self, timeout_ms=2000, **options):
        return pymongo.AsyncMongoClient(self.uri, serverSelectionTimeoutMS=timeout_ms, **options)

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
            if name in self.refused:
                code, code_name, errmsg = self.refused[name]
                return request.command_err(code=code, errmsg=errmsg, codeName=code_name)
            if self.unimplemented & set(request.doc):
                field = min(self.unimplemented & set(request.doc))
                errmsg = f"{name}: support for field {field!r} is not implemented yet"
                code, code_name = self.unimplemented_code
                return request.command_err(code=code, codeName=code_name, errmsg=errmsg)
            if name == "listIndexes":  # the index check, not a data command
                return request.ok(self._indexes(request.doc[name]))
            if name == "listCollections":  # the collation decision, not a data command
                return request.ok(self._collections(request.doc.get("filter", {})))
            pair = self._pair_of(request.doc)
            if pair:
                self._after_its_partner(pair)
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
            try:
                return self._answer(request, fault)
            finally:
                if pair:
                    with self._answered:
                        self._answered_pairs.append(pair)
                        self._answered.notify_all()

    def _answer(self, request, fault):
        if callable(fault):
            fault()
        if fault == "error":
            return request.command_err(code=2, errmsg="injected failure")
        if fault == "drop-before":
            return request.hangup()
        reply = self._execute(request.command_name, request.doc)
        return request.hangup() if fault == "drop-after" else request.ok(reply)

    @staticmethod
    def _pair_of(command):
        """("delete", ids) for an images delete by ``_id``, ("read", ids) for
        a read of images that leaves those out; None for any other command."""
        if command.get("delete") == "images":
            kind, operator, condition = "delete", "$in", command["deletes"][0]["q"].get("_id")
        elif command.get("find") == "images":
            kind, operator, condition = "read", "$nin", command.get("filter", {}).get("_id")
        else:
            return None
        return (kind, condition[operator]) if isinstance(condition, dict) and operator in condition else None

    def _after_its_partner(self, pair, timeout_s=5.0):
        """Holds the second of a pair until the first has been answered (or,
        should it never come, ``timeout_s``)."""
        kind, metadata_ids = pair
        if (kind == "read") == self.reads_first:
            return
        partner = ("delete" if kind == "read" else "read", metadata_ids)
        give_up = time.monotonic() + timeout_s
        with self._answered:
            while partner not in self._answered_pairs and not self._mockup._stopped:
                if time.monotonic() > give_up:
                    self.unpaired.append(pair)
                    return
                self._answered.wait(0.05)

    def _indexes(self, collection):
        indexes = [{"v": 2, "key": dict(index["key"]), "name": name,
                    **({"unique": True} if index.get("unique") else {})}
                   for name, index in self.db[collection].index_information().items()]
        return mongo_wire.cursor(f"{self.db.name}.{collection}", indexes)

    def _collections(self, query):
        """listCollections' answer: the collections ``query`` names that exist
        (made by a write, or by create_collection), with their options."""
        names = set(self.db.list_collection_names()) | set(self.collection_options)
        found = [{"name": name, "type": "collection", "options": self.collection_options.get(name, {})}
                 for name in sorted(names) if query.get("name", name) == name]
        return mongo_wire.cursor(f"{self.db.name}.$cmd.listCollections", found)

    def create_collection(self, name, **options):
        """A collection created with options (a default collation, say),
        which listCollections reports as MongoDB does."""
        self.collection_options[name] = options

    def _execute(self, name, command):
        collection = self.db[command[name]]
        namespace = f"{self.db.name}.{command[name]}"
        if name == "find":
            documents = list(collection.find(command.get("filter", {}), command.get("projection"),
                                             limit=command.get("limit", 0)))
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
            if self._pair_of(command) and self.deletes_missing:
                statement = command["deletes"][0]
                kept_back = {"$in": statement["q"]["_id"]["$in"][self.deletes_missing:]}
                command = {**command, "deletes": [{**statement, "q": {**statement["q"], "_id": kept_back}}]}
                self.deletes_missing = 0
            for statement in command["deletes"]:
                remove = collection.delete_many if statement["limit"] == 0 else collection.delete_one
                removed += remove(statement["q"]).deleted_count
            return {"n": removed}
        else:
            raise AssertionError(f"WireMongo does not know {name!r}")
        return mongo_wire.cursor(namespace, documents)


class SyntheticMongo:
    """A MongoDB holding one model with ``images`` images synthesised on
    demand rather than stored (each with one file and one chunk), served by
    ``synthetic_mongo``. It answers the handshake, the delete's reads of
    ``images`` (up to ``limit`` documents of the model, but those a ``$nin``
    of ``_id`` leaves out; no other model
    references its files) and deletes by ``$in``, remembering what is gone,
    and records each command's name, collection and size."""

    def __init__(self, model_id, images):
        self.model_id = model_id
        self.metadata_ids = [ObjectId(b"\x01" + i.to_bytes(11, "big")) for i in range(images)]
        self.file_ids = [ObjectId(b"\x02" + i.to_bytes(11, "big")) for i in range(images)]
        self.present = {"images": set(self.metadata_ids), "fs.files": set(self.file_ids),
                        "fs.chunks": set(self.file_ids)}
        self.commands = []  # (name, collection, size of the command in bytes)
        self._first_present = 0  # deletes go in order: nothing before this is present

    def answer(self, command, size):
        name = next(iter(command))
        if name.lower() in ("ismaster", "hello"):
            return mongo_wire.HELLO
        if name in ("ping", "endSessions"):
            return {"ok": 1}
        if name == "listCollections":  # the collection asked for, with no default collation
            collection = {"name": command["filter"]["name"], "type": "collection", "options": {}}
            return mongo_wire.cursor("CatalogServiceDB.$cmd.listCollections", [collection])
        if name == "listIndexes":  # the service's index check: every index it wants is there
            indexes = [{"v": 2, "key": dict(index.keys), "name": f"index-{number}", "unique": index.unique}
                       for number, index in enumerate(store.INDEXES)]
            return mongo_wire.cursor(f"CatalogServiceDB.{command[name]}", indexes)
        if name == "report":  # for the test: what is left, and what was asked
            return {"present": {key: len(ids) for key, ids in self.present.items()},
                    "commands": [list(command) for command in self.commands], "ok": 1}
        self.commands.append((name, str(command[name]), size))
        if name == "find" and "model_id" in command["filter"]:
            excluded = set(command["filter"].get("_id", {}).get("$nin", []))
            found = self._images(command.get("limit", 0), excluded)
            return mongo_wire.cursor("CatalogServiceDB.images", found)
        if name == "aggregate":  # other models' references to its files: none
            return mongo_wire.cursor("CatalogServiceDB.images", [])
        if name == "delete":
            # By _id or files_id first; an images delete names its model too: the one held.
            condition = next(iter(command["deletes"][0]["q"].values()))
            gone = self.present[command["delete"]] & set(condition["$in"])
            self.present[command["delete"]] -= gone
            return {"n": len(gone), "ok": 1}
        raise AssertionError(f"SyntheticMongo does not know {name!r} {command}")

    def _images(self, limit, excluded):
        """Up to ``limit`` (0: all) present images, but those ``excluded``."""
        while (self._first_present < len(self.metadata_ids)
               and self.metadata_ids[self._first_present] not in self.present["images"]):
            self._first_present += 1
        found = []
        for i in range(self._first_present, len(self.metadata_ids)):
            if limit and len(found) == limit:
                break
            if self.metadata_ids[i] not in excluded:
                # image_id as an ObjectId, as other writers store it: spelling a
                # million ids out as hex would cost this stand-in most of the test.
                found.append({"_id": self.metadata_ids[i], "model_id": self.model_id,
                              "image_id": self.file_ids[i]})
        return found


def _serve_synthetic(model_id, images, ports):
    stand_in = SyntheticMongo(model_id, images)
    gc.freeze()  # Millions of ids that never die: the collector need not walk them.
    asyncio.run(mongo_wire.serve(stand_in.answer, on_listening=ports.put))


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
