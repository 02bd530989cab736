"""The orphan sweep: an operator's tool for what the old service left behind.

This module owns ``--sweep-orphans`` of ``image_service_server.py``: a
report of chunks without a file, files no ``images`` document references and
``images`` documents whose file is gone, and, with ``--apply`` (and
``--apply-files``), their removal in batches. Which file an ``image_id``
names, and which file an ``fs.files`` ``_id`` is, it decides by the
deletion's own rule (``image_service_store.referenced_file_id``); and like
the deletion, its reads by id, its grouping of chunks and its deletes
compare ids exactly whatever a collection's default collation
(``image_service_store.tool_collation``).
"""

import dataclasses
import datetime
import sys

from bson import ObjectId

from image_service_store import in_batches, referenced_file_id, references_filter, tool_collation


@dataclasses.dataclass
class OrphanReport:
    """What does not hang together in the image store."""

    chunk_file_ids: list  # files_id of chunks whose fs.files document is gone
    unreferenced_file_ids: list  # fs.files no images document points at
    dangling_metadata_ids: list  # images documents whose file is gone or invalid


def find_orphans(db, min_age_s, now=None):
    """Scans images, then files, then chunks (the reverse of the order in
    which uploads write them), so an upload in progress never looks like a
    dangling reference. Files and chunks younger than ``min_age_s`` are not
    counted: they may belong to an upload that has not finished."""
    now = now or datetime.datetime.now(datetime.timezone.utc)
    cutoff = now - datetime.timedelta(seconds=min_age_s)
    references = {}
    for document in db.images.find({}, {"image_id": 1}):
        references[document["_id"]] = referenced_file_id(document.get("image_id"))
    files = {f["_id"]: f.get("uploadDate") for f in db["fs.files"].find({}, {"uploadDate": 1})}
    file_keys = {referenced_file_id(file_id) for file_id in files}
    referenced = set(references.values()) - {None}
    unreferenced = [file_id for file_id, uploaded in files.items()
                    if referenced_file_id(file_id) not in referenced and uploaded is not None
                    and _utc(uploaded) < cutoff]
    dangling = [doc_id for doc_id, file_id in references.items()
                if file_id is None or file_id not in file_keys]
    chunks_exact = tool_collation(db, "fs.chunks")  # grouping too: "abc" and "ABC" are two files
    chunk_groups = db["fs.chunks"].aggregate([{"$group": {"_id": "$files_id"}}], collation=chunks_exact)
    # Chunks whose files_id is another spelling of a file's _id are that
    # file's, as the delete takes them.
    named_files = file_keys - {None}
    without_file = [group["_id"] for group in chunk_groups
                    if group["_id"] not in files and referenced_file_id(group["_id"]) not in named_files]
    newest = newest_chunks(db, without_file, collation=chunks_exact)
    orphan_chunks = [files_id for files_id in without_file
                     if files_id in newest and newest[files_id].generation_time < cutoff]
    return OrphanReport(orphan_chunks, unreferenced, dangling)


def newest_chunks(db, file_ids, batch_size=500, collation=None):
    """The ObjectId of the newest chunk of each of these files, when every
    chunk's ``_id`` is an ObjectId (otherwise its age is unknown and the file
    is left out). Read here, not by ``$max`` in the ``$group``: FerretDB v1
    implements no ``$group`` accumulator but ``$count`` and ``$sum``."""
    newest, unknown = {}, set()
    for batch in in_batches(file_ids, batch_size):
        for chunk in db["fs.chunks"].find({"files_id": {"$in": batch}}, {"files_id": 1}, collation=collation):
            if not isinstance(chunk["_id"], ObjectId):
                unknown.add(chunk["files_id"])
            elif chunk["files_id"] not in newest or newest[chunk["files_id"]] < chunk["_id"]:
                newest[chunk["files_id"]] = chunk["_id"]
    return {files_id: chunk_id for files_id, chunk_id in newest.items() if files_id not in unknown}


def _utc(moment):
    return moment if moment.tzinfo else moment.replace(tzinfo=datetime.timezone.utc)


def references_to(db, file_ids, collation=None):
    """Which of these files (``fs.files`` ids) an ``images`` document
    references now, found by the ``image_id`` index as the delete finds them."""
    keys = {file_id: referenced_file_id(file_id) for file_id in file_ids}
    named = [key for key in set(keys.values()) if key is not None]
    documents = db.images.find(references_filter(named), {"image_id": 1}, collation=collation)
    referenced = {referenced_file_id(document.get("image_id")) for document in documents}
    return {file_id for file_id, key in keys.items() if key is not None and key in referenced}


def sweep_orphans(db, report, apply_files, batch_size):
    """Removes what the report found, ``batch_size`` ids per command: chunks
    without a file and metadata pointing at nothing, and unreferenced files
    only when ``apply_files``. Returns the number of documents removed."""
    # Exactly these ids: under a case-insensitive default collation a string
    # id would also match its case variants, another model's or file's.
    exact = {name: tool_collation(db, name) for name in ("images", "fs.files", "fs.chunks")}
    removed = {"chunks": 0, "images": 0, "files": 0}
    for batch in in_batches(report.chunk_file_ids, batch_size):
        removed["chunks"] += db["fs.chunks"].delete_many({"files_id": {"$in": batch}},
                                                         collation=exact["fs.chunks"]).deleted_count
    for batch in in_batches(report.dangling_metadata_ids, batch_size):
        removed["images"] += db.images.delete_many({"_id": {"$in": batch}},
                                                   collation=exact["images"]).deleted_count
    if apply_files:
        for batch in in_batches(report.unreferenced_file_ids, batch_size):
            # A file is gone for good: look once more for a reference made
            # since the scan.
            taken = references_to(db, batch, exact["images"])
            batch = [file_id for file_id in batch if file_id not in taken]
            removed["files"] += db["fs.files"].delete_many({"_id": {"$in": batch}},
                                                           collation=exact["fs.files"]).deleted_count
            removed["chunks"] += db["fs.chunks"].delete_many({"files_id": {"$in": batch}},
                                                             collation=exact["fs.chunks"]).deleted_count
    return removed


def run_sweep(db, args, out=sys.stdout, now=None):
    """Prints the orphan report, and sweeps when told to."""
    report = find_orphans(db, args.min_age_s, now)
    for label, ids in (("chunks without a file (by files_id)", report.chunk_file_ids),
                       ("files no images document references", report.unreferenced_file_ids),
                       ("images documents whose file is gone", report.dangling_metadata_ids)):
        sample = ", ".join(str(i) for i in ids[:5]) + (", ..." if len(ids) > 5 else "")
        print(f"{len(ids):>8}  {label}{': ' + sample if ids else ''}", file=out)
    if not args.apply:
        print("report only: nothing changed (--apply removes orphan chunks and dangling metadata,"
              " --apply-files unreferenced files too)", file=out)
        return
    removed = sweep_orphans(db, report, args.apply_files, args.batch_size)
    print(f"removed {removed['chunks']} chunks, {removed['images']} images documents,"
          f" {removed['files']} files", file=out)



def add_arguments(parser):
    """The sweep's options, on the server's command line."""
    parser.add_argument("--sweep-orphans", action="store_true",
                        help="report orphaned chunks, files and metadata, then exit")
    parser.add_argument("--apply", action="store_true",
                        help="with --sweep-orphans: remove orphan chunks and dangling metadata")
    parser.add_argument("--apply-files", action="store_true",
                        help="with --apply: remove unreferenced files too")
    parser.add_argument("--batch-size", type=int, help="with --sweep-orphans: ids per delete command (500)")
    parser.add_argument("--min-age-s", type=float,
                        help="with --sweep-orphans: leave files and chunks younger than this (3600 s): they"
                             " may be uploads in progress")


def check_arguments(parser, args):
    """Refuses sweep options that make no sense, and fills in the defaults."""
    sweep_only = {"--apply": args.apply, "--apply-files": args.apply_files,
                  "--batch-size": args.batch_size is not None, "--min-age-s": args.min_age_s is not None}
    given = [name for name, present in sweep_only.items() if present]
    if not args.sweep_orphans and given:
        parser.error(f"{', '.join(given)} needs --sweep-orphans")
    if args.apply_files and not args.apply:
        parser.error("--apply-files needs --apply")
    args.batch_size = 500 if args.batch_size is None else args.batch_size
    args.min_age_s = 3600.0 if args.min_age_s is None else args.min_age_s
    if args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    if not 0 <= args.min_age_s < float("inf"):
        parser.error("--min-age-s must be zero or more seconds")
