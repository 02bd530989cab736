"""The image store: what the upload service writes, how to read it, how to open it.

This module owns what the deletion and the operator's tools agree on about
the data: how the upload service stores an image (a GridFS file in bucket
``fs``, then an ``images`` document naming it), which ``images`` documents
are a model's, how an ``image_id`` names a GridFS file, what one read of
``images`` holds, the indexes deletes need (checked at start, created by
``--create-indexes``), opening the database (every wait bounded by
MONGO_TIMEOUT_MS; reads on the primary), and the in-memory stand-in with
sample images that ``--in-memory`` serves; and whether reads must name the
collation "simple" to compare strings exactly (decided once, from what the
server says).
"""

import collections
import dataclasses
import datetime
import logging
import weakref

import pymongo
import pymongo.errors
from bson import ObjectId, Regex
from pymongo.collation import Collation
from pymongo.read_concern import ReadConcern

from image_service_settings import ConfigError, describe_database, redact

log = logging.getLogger("image_service.store")


# ASCII whitespace, as MongoDB's regular expressions know it (``\s``).
WHITESPACE = " \t\n\r\x0b\x0c"


def referenced_file_id(value):
    """The GridFS file a value names, as the key that identifies it, or None
    if it names none: the one rule for an ``images`` document's
    ``image_id`` and an ``fs.files`` ``_id``, used by the delete, the dry
    run and the sweep alike.

    An ObjectId names itself, and so does its 24-digit hex spelling in lower
    or in upper case, with or without surrounding ASCII whitespace: the
    upload service writes the lower-case string, other writers the ObjectId,
    and GridFS allows either as ``_id``. Any other string (mixed-case hex
    among them) or integer names the file whose ``_id`` is exactly that
    value: every such spelling is one that references_filter finds by index.
    Anything else (no value, an array, a document) names no file.
    """
    if isinstance(value, ObjectId):
        return value
    if isinstance(value, str):
        hex_id = value.strip(WHITESPACE)
        if ObjectId.is_valid(hex_id) and hex_id in (hex_id.lower(), hex_id.upper()):
            return ObjectId(hex_id)
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return None


def stored_file_ids(file_ids):
    """The ``_id`` values the GridFS files of these keys may have: for an
    ObjectId, itself and its hex string in either case; for any other key,
    the key itself."""
    forms = []
    for file_id in file_ids:
        if isinstance(file_id, ObjectId):
            hex_id = file_id.binary.hex()  # str(file_id), at a fraction of the cost
            forms += [file_id, hex_id, hex_id.upper()]
        else:
            forms.append(file_id)
    return forms


# Strings that start with whitespace: few, and each of these patterns has a
# literal first character, so MongoDB scans only them in the index.
_LEADING_WHITESPACE = [Regex("^" + character) for character in WHITESPACE]
# WHITESPACE as a class spelled out: ``\s`` in FerretDB's (Go's) regular
# expressions leaves out the vertical tab that MongoDB's includes.
_WHITESPACE_CLASS = "[ \\t\\n\\r\\x0b\\x0c]"


def references_filter(file_ids):
    """The filter for every ``images`` document that references one of these
    files (keys of referenced_file_id) in a spelling that rule accepts (and a
    few more, which the caller parses), all by the ``image_id`` index: each
    key's stored forms; the hex of an ObjectId followed by whitespace (a
    pattern with a literal prefix: an index range); any string that starts
    with whitespace. Exact values and patterns go in two branches, so a
    document that matches exactly is never tried against the patterns."""
    exact, patterns = stored_file_ids(file_ids), list(_LEADING_WHITESPACE)
    for file_id in file_ids:
        if isinstance(file_id, ObjectId):
            lower = file_id.binary.hex()
            # Not re.compile: a pattern only MongoDB runs need not be compiled here.
            patterns += [Regex(f"^{lower}{_WHITESPACE_CLASS}"), Regex(f"^{lower.upper()}{_WHITESPACE_CLASS}")]
    return {"$or": [{"image_id": {"$in": exact}}, {"image_id": {"$in": patterns}}]}


def stored_model_id_forms(model_id: str) -> list:
    """The values ``images.model_id`` may hold for this model: the string,
    and also the ObjectId when the string is one's canonical (lower-case hex)
    spelling. Matching is exact: no trimming, case folding or patterns."""
    forms = [model_id]
    if ObjectId.is_valid(model_id) and str(ObjectId(model_id)) == model_id:
        forms.append(ObjectId(model_id))
    return forms


def images_of(forms: list) -> dict:
    """The filter for the ``images`` documents whose ``model_id`` is one of
    ``forms``: equal to it, not an array that merely contains it (such a
    document is another model's)."""
    return {"model_id": {"$in": forms, "$not": {"$type": "array"}}}


def images_of_other_models(forms: list) -> dict:
    """The filter for every other ``images`` document: another model id, no
    model id, or an array of them."""
    return {"$or": [{"model_id": {"$nin": forms}}, {"model_id": {"$type": "array"}}]}


@dataclasses.dataclass
class ImagesRead:
    """One read of ``images``: each model's documents and the files they name."""

    metadata_ids: dict = dataclasses.field(default_factory=lambda: collections.defaultdict(list))
    file_ids: dict = dataclasses.field(default_factory=lambda: collections.defaultdict(set))
    invalid_references: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    def add(self, model_id, document):
        self.metadata_ids[model_id].append(document["_id"])
        file_id = referenced_file_id(document.get("image_id"))
        if file_id is None:
            self.invalid_references[model_id] += 1
        else:
            self.file_ids[model_id].add(file_id)

    def size(self):
        return sum(map(len, self.metadata_ids.values()))

    def file_owners(self, model_ids):
        """Each file named, with the first of ``model_ids`` naming it: a file
        two models of a batch share is counted once, with the first."""
        owners = {}
        for model_id in model_ids:
            for file_id in self.file_ids[model_id]:
                owners.setdefault(file_id, model_id)
        return owners


def in_batches(items, size):
    """``items`` in slices of at most ``size``."""
    for start in range(0, len(items), size):
        yield items[start:start + size]


@dataclasses.dataclass(frozen=True)
class Index:
    """An index deletes need, and what its absence costs."""

    collection: str
    keys: tuple
    unique: bool
    cost: str

    def spec(self):
        return "{" + ", ".join(f"{key}: {order}" for key, order in self.keys) + "}"


INDEXES = (
    Index("images", (("model_id", 1),), False, "every delete scans the whole images collection"),
    Index("images", (("image_id", 1),), False,
          "every delete scans the whole images collection for other models' references to its files"),
    Index("fs.chunks", (("files_id", 1), ("n", 1)), True,
          "every chunk delete scans all chunks, and GridFS itself misbehaves"),
)


def _serves(index, present):
    """Whether an index as ``index_information`` describes it serves ``index``:
    GridFS's must be the unique one itself; the others need only lead with
    the same fields, in any direction. A partial index, or one with a
    collation other than simple, serves none: deletes cannot use it."""
    collation = present.get("collation", {}).get("locale", "simple")
    if "partialFilterExpression" in present or collation != "simple":
        return False
    keys = [tuple(key) for key in present["key"]]
    if index.unique:
        return keys == list(index.keys) and bool(present.get("unique"))
    return [name for name, _ in keys[:len(index.keys)]] == [name for name, _ in index.keys]


def missing_from(present):
    """The INDEXES that no index in ``present`` serves (``index_information``
    of each collection, by collection name)."""
    return [index for index in INDEXES
            if not any(_serves(index, info) for info in present[index.collection].values())]


def missing_indexes(db):
    """The INDEXES that no index in the database serves."""
    collections = {index.collection for index in INDEXES}
    return missing_from({name: db[name].index_information() for name in collections})


async def warn_about_missing_indexes(db):
    """One WARNING per missing index of an AsyncDatabase (or the in-memory
    stand-in): what it costs, and how to create it."""
    present = {}
    for name in {index.collection for index in INDEXES}:
        present[name] = await db[name].index_information()
    for index in missing_from(present):
        unique = ", {unique: true}" if index.unique else ""
        log.warning("index missing on %s %s: %s; create it with: .venv/bin/python image_service_server.py"
                    " --create-indexes (or db.getCollection(%r).createIndex(%s%s))",
                    index.collection, index.spec(), index.cost, index.collection, index.spec(), unique)


def create_indexes(db):
    """Creates the INDEXES that no index in the database serves yet, and
    returns them. An index that serves under another name counts as
    present, as the start-up check decides: asking MongoDB to create it
    again would fail ("index already exists with a different name")."""
    missing = missing_indexes(db)
    for index in missing:
        options = {"unique": True} if index.unique else {}
        db[index.collection].create_index(list(index.keys), **options)
    still_missing = missing_indexes(db)
    if still_missing:  # FerretDB v1 accepts, and ignores, an index its name already has
        raise pymongo.errors.OperationFailure(
            f"the server accepted, but did not create: {describe_indexes(still_missing)}; drop the index"
            " in the way (same name or same keys), then run --create-indexes again")
    return missing


def describe_indexes(indexes=INDEXES):
    """Indexes in one line, for --create-indexes to report."""
    return ", ".join(f"{index.collection} {index.spec()}{' (unique)' if index.unique else ''}"
                     for index in indexes)


GRIDFS_CHUNK_SIZE = 255 * 1024  # GridFS's default chunk size


def store_image(db, model_id, data, name=None):
    """Stores an image exactly as the upload service does: a GridFS file in
    bucket ``fs`` named ``<model_id>.jpg``, then its ``images`` document."""
    file_id = ObjectId()
    for n, start in enumerate(range(0, len(data), GRIDFS_CHUNK_SIZE)):
        chunk = data[start:start + GRIDFS_CHUNK_SIZE]
        db["fs.chunks"].insert_one({"files_id": file_id, "n": n, "data": chunk})
    db["fs.files"].insert_one({
        "_id": file_id,
        "filename": f"{model_id}.jpg",
        "length": len(data),
        "chunkSize": GRIDFS_CHUNK_SIZE,
        "uploadDate": datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0),
    })
    db.images.insert_one({"name": name or f"{model_id}.jpg", "image_id": str(file_id), "model_id": model_id})
    return file_id


SAMPLE_MODELS = {"sample-chair": 2, "sample-table": 1, "sample-lamp": 3}


def open_in_memory_database(database_name):
    """A mongomock database holding a few sample images, with the indexes:
    the operator's tools use it as it is, the server through InMemoryDatabase."""
    import mongomock  # Only this mode needs it.

    db = mongomock.MongoClient()[database_name]
    create_indexes(db)  # as a well-kept database has them
    for model_id, count in SAMPLE_MODELS.items():
        for number in range(count):
            store_image(db, model_id, bytes(300 * 1024), name=f"{model_id}-{number}.jpg")
    return db


class InMemoryDatabase:
    """A mongomock database behind the few methods of pymongo's
    AsyncDatabase that the service calls, so that one deletion path serves
    MongoDB and the in-memory stand-in alike. mongomock answers at once, on
    the event loop's own thread (it is not safe to use from two threads)."""

    def __init__(self, db):
        self.name = db.name
        self.client = _InMemoryClient()
        self._db = db

    def __getitem__(self, name):
        return _InMemoryCollection(self._db[name])

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        return self[name]

    async def list_collections(self, filter):
        """The collection ``filter`` names, if it exists: mongomock keeps no
        collection options (no default collation)."""
        names = [name for name in self._db.list_collection_names() if name == filter["name"]]
        return _InMemoryCursor(iter([{"name": name, "type": "collection", "options": {}} for name in names]))


class _InMemoryClient:
    def __init__(self):
        self.admin = self

    async def command(self, name):
        return {"ok": 1}


class _InMemoryCollection:
    def __init__(self, collection):
        self._collection = collection

    def find(self, *args, **kwargs):
        return _InMemoryCursor(self._collection.find(*args, **kwargs))

    async def aggregate(self, pipeline, **kwargs):
        return _InMemoryCursor(self._collection.aggregate(pipeline, **kwargs))

    async def delete_many(self, query, **kwargs):
        return self._collection.delete_many(query, **kwargs)

    async def index_information(self):
        return self._collection.index_information()


class _InMemoryCursor:
    def __init__(self, cursor):
        self._cursor = cursor

    def __aiter__(self):
        return self

    async def __anext__(self):
        try:
            return next(self._cursor)
        except StopIteration:
            raise StopAsyncIteration from None


# ---------------------------------------------------------------------------
# Exact reads
# ---------------------------------------------------------------------------
#
# The deletion compares model ids and file ids exactly. On MongoDB a
# collection created with a non-simple default collation (case-insensitive,
# say) would compare "Chair" equal to "chair", unless each read names the
# collation "simple". Servers that implement no collation at all (FerretDB
# v1, Amazon DocumentDB before 8.0) refuse a read that names one, with
# NotImplemented; they compare exactly anyway. So a read names "simple" only
# when the collection's own options give it another default collation.

EXACT = Collation("simple")
# What a server answers for a field or command it does not implement:
# NotImplemented, CommandNotSupported, CommandNotFound, and Amazon DocumentDB's
# "option collation is currently not supported" (before 8.0).
NOT_IMPLEMENTED_CODES = (238, 115, 59, 303)
# What a user without the listCollections privilege is answered: Unauthorized,
# and Atlas's "user is not allowed to do action" (AtlasError).
UNAUTHORIZED_CODES = (13, 8000)

_read_collations = weakref.WeakKeyDictionary()  # database -> Collation | None, once decided


async def read_collation(db, collection="images"):
    """The collation the deletion's reads of ``collection`` pass: EXACT when
    its default collation is not simple, else None (pass nothing). Decided
    once per database, from listCollections; while the collection does not
    exist yet, nothing is decided and the next read asks again. Two calls
    deciding at once both ask: they reach the same answer."""
    decided_here = _read_collations.get(db, {})
    if collection in decided_here:
        return decided_here[collection]
    decided, collation = await _decide_read_collation(db, collection)
    if decided:
        _read_collations.setdefault(db, {})[collection] = collation
    return collation


async def _decide_read_collation(db, collection):
    """(decided, collation): whether the server's answers settle it, and the
    collation reads must pass."""
    try:
        options = await _collection_options(db, collection)
    except pymongo.errors.OperationFailure as error:
        if error.code in NOT_IMPLEMENTED_CODES:  # it cannot say: it keeps no collations either
            return True, None
        if error.code not in UNAUTHORIZED_CODES:
            raise
        log.warning("not allowed to list collections: reads of %s name the collation \"simple\" unless"
                    " the server refuses it (grant listCollections to read without it)", collection)
        return True, await _exact_unless_refused(db, collection)
    if options is None:
        return False, None
    if not _needs_exact_collation(options):
        return True, None
    return True, await _exact_unless_refused(db, collection)


def _needs_exact_collation(options):
    """Whether a collection with these options (as listCollections gives
    them) compares strings other than exactly by default."""
    collation = options.get("collation")
    return bool(collation) and collation.get("locale") != "simple"


async def _exact_unless_refused(db, collection):
    """EXACT, unless one read naming it is answered NotImplemented or
    CommandNotSupported: then None (the server compares exactly anyway)."""
    try:
        async for _ in db[collection].find({}, {"_id": 1}, limit=1, collation=EXACT):
            pass
    except pymongo.errors.OperationFailure as error:
        if error.code not in NOT_IMPLEMENTED_CODES:
            raise
        log.warning("this server does not implement collation on reads of %s: they go without it, and the"
                    " server compares model ids by its own rules", collection)
        return None
    return EXACT


async def _collection_options(db, collection):
    """The collection's options, or None if it does not exist."""
    async for info in await db.list_collections(filter={"name": collection}):
        return info.get("options", {})
    return None


def tool_collation(db, collection):
    """The collation the operator's tools (synchronous) pass on ``collection``,
    by the deletion's rule: EXACT when its default collation is not simple or
    cannot be listed, unless the server refuses a read naming it."""
    try:
        found = list(db.list_collections(filter={"name": collection}))
    except NotImplementedError:  # mongomock (--in-memory): it keeps no collections' options
        return None
    except pymongo.errors.OperationFailure as error:
        if error.code in NOT_IMPLEMENTED_CODES:
            return None
        if error.code not in UNAUTHORIZED_CODES:
            raise
        found = [{"options": {"collation": {"locale": "not listed"}}}]  # may not look: assume the worst
    if not found or not _needs_exact_collation(found[0].get("options", {})):
        return None
    try:
        db[collection].find_one({}, {"_id": 1}, collation=EXACT)
    except pymongo.errors.OperationFailure as error:
        if error.code not in NOT_IMPLEMENTED_CODES:
            raise
        return None
    return EXACT


# ---------------------------------------------------------------------------
# Opening the store
# ---------------------------------------------------------------------------


def connect_to_mongo(config, event_listeners=(), client_class=pymongo.AsyncMongoClient):
    """A client whose every wait is bounded by MONGO_TIMEOUT_MS, not the
    driver's 30 s default: the asyncio client the server runs on, or (for
    the operator's tools) another class. It connects lazily, so start-up
    never blocks."""
    timeout_ms = int(config.mongo_timeout_s * 1000)
    return client_class(
        config.mongo_uri,
        appname="image-service",
        serverSelectionTimeoutMS=timeout_ms,
        connectTimeoutMS=timeout_ms,
        connect=False,
        event_listeners=list(event_listeners),
    )


def open_database(config, in_memory, event_listeners=(), serving=True):
    """The database, and how to describe it in the log: for serving, on
    pymongo's asyncio client (or the in-memory stand-in behind the same
    methods); for the operator's tools, on the synchronous one."""
    if in_memory:
        db = open_in_memory_database(config.mongo_db)
        return InMemoryDatabase(db) if serving else db, f"in-memory stand-in/{config.mongo_db}"
    client_class = pymongo.AsyncMongoClient if serving else pymongo.MongoClient
    try:
        client = connect_to_mongo(config, event_listeners, client_class)
    except (pymongo.errors.ConfigurationError, ValueError) as error:  # The driver's words for a bad URI.
        raise ConfigError(f"MONGO_URI: {redact(str(error).splitlines()[0], config.secrets)}") from None
    # Reads go to the primary, whatever the URI's readPreference, and see
    # its own latest writes (read concern "local", whatever the URI says): a
    # lagging secondary or an "available" read could miss a recent upload or
    # see a deleted document again, and the reply would not tell the truth.
    db = client.get_database(config.mongo_db, read_preference=pymongo.ReadPreference.PRIMARY,
                             read_concern=ReadConcern("local"))
    return db, describe_database(config)
