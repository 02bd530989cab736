"""The image store's shape: what the upload service writes, and how to read it.

This module owns what the deletion and the operator's tools agree on about
the data: how the upload service stores an image (a GridFS file in bucket
``fs``, then an ``images`` document naming it), how an ``image_id`` names a
GridFS file, the indexes deletes need (checked at start, created by
``--create-indexes``), and the in-memory stand-in with sample images that
``--in-memory`` serves.
"""

import datetime
import logging

from bson import ObjectId

log = logging.getLogger("image_service.store")


def referenced_file_id(image_id):
    """The GridFS file id an ``images`` document points at, or None if its
    ``image_id`` is no valid id. The upload service writes the lower-case hex
    string, other writers the ObjectId itself; upper-case hex and stray
    surrounding spaces still name the same file. The delete and the sweep
    both decide with this one function."""
    if isinstance(image_id, ObjectId):
        return image_id
    if isinstance(image_id, str) and ObjectId.is_valid(image_id.strip()):
        return ObjectId(image_id.strip())
    return None


def in_batches(items, size):
    """``items`` in slices of at most ``size``."""
    for start in range(0, len(items), size):
        yield items[start:start + size]


INDEXES = {
    "images": ([("model_id", 1)], {}, "every delete scans the whole images collection"),
    "fs.chunks": ([("files_id", 1), ("n", 1)], {"unique": True},
                  "every chunk delete scans all chunks, and GridFS itself misbehaves"),
}


def missing_indexes(db):
    """The collections of INDEXES lacking theirs: ``images`` needs an index
    whose first key is ``model_id``; ``fs.chunks`` GridFS's unique one."""
    missing = []
    for collection, (keys, _, _) in INDEXES.items():
        present = db[collection].index_information().values()
        if collection == "images":
            found = any(index["key"][0][0] == keys[0][0] for index in present)
        else:
            found = any([tuple(k) for k in index["key"]] == keys and index.get("unique") for index in present)
        if not found:
            missing.append(collection)
    return missing


def warn_about_missing_indexes(db):
    """One WARNING per missing index: what it costs, and how to create it."""
    for collection in missing_indexes(db):
        keys, options, cost = INDEXES[collection]
        spec = "{" + ", ".join(f"{key}: {order}" for key, order in keys) + "}"
        unique = ", {unique: true}" if options.get("unique") else ""
        log.warning("index missing on %s %s: %s; create it with: python3 image_service_server.py"
                    " --create-indexes (or db.getCollection(%r).createIndex(%s%s))",
                    collection, spec, cost, collection, spec, unique)


def create_indexes(db):
    """Creates both indexes; MongoDB leaves an existing one as it is."""
    for collection, (keys, options, _) in INDEXES.items():
        db[collection].create_index(keys, **options)


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
    """A mongomock database holding a few sample images, with the indexes."""
    import mongomock  # Only this mode needs it.

    db = mongomock.MongoClient()[database_name]
    create_indexes(db)  # as a well-kept database has them
    for model_id, count in SAMPLE_MODELS.items():
        for number in range(count):
            store_image(db, model_id, bytes(300 * 1024), name=f"{model_id}-{number}.jpg")
    return db

