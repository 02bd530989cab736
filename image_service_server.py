"""The image service: deletes the images of 3D models from MongoDB GridFS.

The upload service stores each image as a GridFS file in the default bucket
(an ``fs.files`` document whose data sits in ``fs.chunks``) and records it in
the ``images`` collection as ``{name, image_id, model_id}``. Before the catalog
service deletes a model it calls ``DeleteImageByModelId``, and deletes the
model only when the reply says ``success: true``.

This file is the service's story, top to bottom: the deletion (what it does
to the database, in what order and why), the servicer whose methods mirror
``image_service.proto``, building and starting the server, the drain, and the
command line. The rest lives beside it, one concern a file:

- ``image_service_settings.py``: settings from the environment and ``.env``,
  all checked before anything listens; redaction of secrets;
- ``image_service_calls.py``: the interceptors around every call (request
  ids and the log line, bearer tokens, the admission bound);
- ``image_service_observability.py``: metrics, driver command timing, the
  log format, the MongoDB health monitor;
- ``image_service_store.py``: what the upload service writes, how an
  ``image_id`` names a GridFS file, the indexes, the in-memory sample store;
- ``image_service_sweep.py``: the orphan sweep (``--sweep-orphans``);
- ``image_service_pb2*.py``: generated from ``image_service.proto``.

Run ``python3 image_service_server.py --help`` for the command line.
"""

import argparse
import asyncio
import collections
import dataclasses
import logging
import os
import signal
import sys
import threading
import time
import unicodedata
from concurrent import futures

# gRPC's own log lines (one per failed TLS handshake, say) go to stderr
# outside our log format, and any client can cause them: errors only, unless
# the operator asks for more. gRPC reads this once, when it is imported.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import grpc
import pymongo
import pymongo.errors
from bson import ObjectId
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

import image_service_pb2 as pb2
import image_service_pb2_grpc as pb2_grpc
import image_service_sweep as sweep
from image_service_calls import CURRENT_CALL, Admission, BearerTokenInterceptor, CallInterceptor
from image_service_observability import (
    CommandTimer,
    Metrics,
    MongoHealthMonitor,
    configure_logging,
    describe_failure,
    start_metrics_endpoint,
)
from image_service_settings import (
    ConfigError,
    check_listen_address,
    describe_database,
    dotenv_permission_warning,
    host_in_uri,
    load_config,
    read_environment,
    redact,
)
from image_service_store import (
    SAMPLE_MODELS,
    create_indexes,
    in_batches,
    open_in_memory_database,
    referenced_file_id,
)

log = logging.getLogger("image_service")

SERVICE_NAME = pb2.DESCRIPTOR.services_by_name["ImageService"].full_name

# ---------------------------------------------------------------------------
# The deletion
# ---------------------------------------------------------------------------

MAX_MODEL_ID_LENGTH = 256
MAX_BATCH_SIZE = 1000
# The read asks for up to this many documents per reply, so that a batch
# costs one command, not one per 101 documents (the server's default batch).
READ_BATCH_SIZE = 100_000
# Ids per delete command: 100,000 ObjectIds make a command of 1.9 MB,
# far below MongoDB's 16 MB limit (which one $in reaches near 800,000 ids).
ID_BATCH_SIZE = 100_000


def invalid_model_id_reason(model_id):
    """Why a model id is refused, or None when it is acceptable."""
    if not model_id:
        return "model_id is empty"
    if len(model_id) > MAX_MODEL_ID_LENGTH:
        return f"model_id is longer than {MAX_MODEL_ID_LENGTH} characters"
    if any(unicodedata.category(ch) == "Cc" for ch in model_id):
        return "model_id contains control characters"
    return None


def stored_model_id_forms(model_id):
    """The values ``images.model_id`` may hold for this model: the string,
    and also the ObjectId when the string is one's canonical (lower-case hex)
    spelling. Matching is exact: no trimming, case folding or patterns."""
    forms = [model_id]
    if ObjectId.is_valid(model_id) and str(ObjectId(model_id)) == model_id:
        forms.append(ObjectId(model_id))
    return forms


def cut_for_reply(model_id):
    """A model id as a reply may carry it. An invalid one can be megabytes
    long; cut, and marked so, a batch of them stays far below a caller's
    4 MB receive limit."""
    if len(model_id) <= MAX_MODEL_ID_LENGTH:
        return model_id
    return f"{model_id[:MAX_MODEL_ID_LENGTH]}...[cut from {len(model_id)} characters]"


@dataclasses.dataclass
class ModelImages:
    """One model's images as read from ``images``, and what removing them did."""

    metadata_ids: list = dataclasses.field(default_factory=list)
    file_ids: set = dataclasses.field(default_factory=set)
    invalid_references: int = 0
    # What the database reported removed (see split_among_models for batches).
    deleted_images: int = 0
    deleted_files: int = 0
    counts_shared_out: bool = False
    file_bytes: int = 0  # dry runs only


def read_images(db, model_ids):
    """Every ``images`` document of these models, grouped by model: one
    ``find`` (and a ``getMore`` per further READ_BATCH_SIZE documents).

    Only documents whose ``model_id`` equals a requested id (or its ObjectId)
    are kept; one that merely matched through an array is another model's.
    """
    wanted = {form: model_id for model_id in model_ids for form in stored_model_id_forms(model_id)}
    found = {model_id: ModelImages() for model_id in model_ids}
    forms = list(wanted)
    cursor = db.images.find(
        {"model_id": forms[0] if len(forms) == 1 else {"$in": forms}},
        {"model_id": 1, "image_id": 1},
        batch_size=READ_BATCH_SIZE,
    )
    for document in cursor:
        stored = document.get("model_id")
        if not isinstance(stored, (str, ObjectId)) or stored not in wanted:
            continue
        images = found[wanted[stored]]
        images.metadata_ids.append(document["_id"])
        file_id = referenced_file_id(document.get("image_id"))
        if file_id is None:
            images.invalid_references += 1
        else:
            images.file_ids.add(file_id)
    return found


def delete_by_ids(collection, field, ids):
    """Deletes the documents whose ``field`` is one of ``ids``, ID_BATCH_SIZE
    ids per command; returns how many the database removed."""
    return sum(collection.delete_many({field: {"$in": batch}}).deleted_count
               for batch in in_batches(ids, ID_BATCH_SIZE))


def split_among_models(wanted, removed):
    """Splits the ``removed`` count among models that wanted ``wanted[i]``
    each. Exact for one model, and whenever everything wanted was removed;
    otherwise (a concurrent delete, files already gone) the shortfall is
    taken from the last models, so the shares still add up to ``removed``."""
    shortfall, shares = sum(wanted) - removed, []
    for count in reversed(wanted):
        taken = min(count, shortfall)
        shortfall -= taken
        shares.append(count - taken)
    return shares[::-1]


def delete_images_of_models(db, model_ids):
    """Removes every image of the given models; returns what each had and
    what the database reported removed.

    Four commands for up to ID_BATCH_SIZE images: one read, then three
    deletes by ``$in``; past that, each step takes one command per
    ID_BATCH_SIZE ids, so no command nears MongoDB's 16 MB limit. The order
    makes every failure safe to retry: every file batch (``fs.files``, then
    ``fs.chunks``, as GridFS itself deletes) goes first and the metadata
    last, so until the metadata is gone it still points at whatever a retry
    must finish. Only the metadata documents that were read are deleted (by
    ``_id``): an image uploaded while this runs is left whole, never as an
    orphaned file, and the next delete removes it.
    """
    found = read_images(db, model_ids)
    models = [images for images in found.values() if images.metadata_ids]
    file_ids = list(set().union(*(images.file_ids for images in models)))
    removed_files = delete_by_ids(db["fs.files"], "_id", file_ids) if file_ids else 0
    if file_ids:
        delete_by_ids(db["fs.chunks"], "files_id", file_ids)
    metadata_ids = [i for images in models for i in images.metadata_ids]
    removed_images = delete_by_ids(db.images, "_id", metadata_ids) if metadata_ids else 0
    files = split_among_models([len(images.file_ids) for images in models], removed_files)
    metadata = split_among_models([len(images.metadata_ids) for images in models], removed_images)
    for images, deleted_files, deleted_images in zip(models, files, metadata, strict=False):
        images.deleted_files, images.deleted_images = deleted_files, deleted_images
        images.counts_shared_out = len(models) > 1 and (
            removed_files < len(file_ids) or removed_images < len(metadata_ids))
    return found


def preview_images_of_models(db, model_ids):
    """What delete_images_of_models would remove now, without writing: the
    same read, then the files' lengths (one read per ID_BATCH_SIZE files)."""
    found = read_images(db, model_ids)
    file_ids = list(set().union(*(images.file_ids for images in found.values())))
    lengths = {}
    for batch in in_batches(file_ids, ID_BATCH_SIZE):
        files = db["fs.files"].find({"_id": {"$in": batch}}, {"length": 1}, batch_size=READ_BATCH_SIZE)
        lengths.update((file["_id"], int(file.get("length") or 0)) for file in files)
    for images in found.values():
        existing = images.file_ids & lengths.keys()
        images.deleted_images, images.deleted_files = len(images.metadata_ids), len(existing)
        images.file_bytes = sum(lengths[file_id] for file_id in existing)
    return found


def preview_reply(model_id, images):
    """The reply for one model in a dry run."""
    return pb2.DeleteImageResponse(
        success=True,
        outcome=pb2.OUTCOME_DELETED if images.deleted_images else pb2.OUTCOME_NOTHING_TO_DELETE,
        model_id=model_id,
        deleted_images=images.deleted_images,
        deleted_files=images.deleted_files,
        file_bytes=images.file_bytes,
        message=(f"would delete {_plural(images.deleted_images, 'image')} and"
                 f" {_plural(images.deleted_files, 'file')} ({images.file_bytes} bytes);"
                 " nothing was changed"),
    )


def _plural(count, noun):
    return f"{count} {noun}{'' if count == 1 else 's'}"


def deletion_reply(model_id, images):
    """The reply for one model whose delete went through."""
    if images.deleted_images == 0 and images.deleted_files == 0:
        gone = (f"; a concurrent delete removed its {_plural(len(images.metadata_ids), 'image')} first"
                if images.metadata_ids else "")
        return pb2.DeleteImageResponse(
            success=True,
            outcome=pb2.OUTCOME_NOTHING_TO_DELETE,
            model_id=model_id,
            message=f"no images of model {model_id!r}; nothing to delete{gone}",
        )
    notes = [f"deleted {_plural(images.deleted_images, 'image')} and {_plural(images.deleted_files, 'file')}"]
    if images.counts_shared_out:
        notes.append("counts shared out within the batch: some files were already gone or a concurrent"
                     " delete removed some images first")
    else:
        missing_files = len(images.file_ids) - images.deleted_files
        if missing_files:
            notes.append(f"{_plural(missing_files, 'reference')} to a file already gone")
        if len(images.metadata_ids) > images.deleted_images:
            taken = len(images.metadata_ids) - images.deleted_images
            notes.append(f"{taken} removed by a concurrent delete first")
    if images.invalid_references:
        notes.append(f"{_plural(images.invalid_references, 'reference')} had no valid file id")
    return pb2.DeleteImageResponse(
        success=True,
        outcome=pb2.OUTCOME_DELETED,
        model_id=model_id,
        deleted_images=images.deleted_images,
        deleted_files=images.deleted_files,
        message="; ".join(notes),
    )


def delete_and_describe(db, model_ids, deadline, dry_run=False):
    """One reply per requested id, in order: invalid ids are answered without
    touching anything, the valid ones are deleted together (or, in a dry run,
    previewed) before ``deadline`` (``time.monotonic()``), and a database
    failure is reported on each of them."""
    reasons = {model_id: invalid_model_id_reason(model_id) for model_id in model_ids}
    valid = [model_id for model_id, reason in reasons.items() if reason is None]
    timeout_s = deadline - time.monotonic()
    try:
        if valid and timeout_s <= 0:
            raise pymongo.errors.ExecutionTimeout("the call's deadline passed before the database was asked")
        with pymongo.timeout(timeout_s):
            work = preview_images_of_models if dry_run else delete_images_of_models
            found = work(db, valid) if valid else {}
        failure = None
    except Exception as error:  # Reported to the caller; the server goes on.
        log.warning("delete of %d model(s) failed: %s: %s", len(valid), type(error).__name__, error)
        failure = classify_failure(error)
    replies = []
    for model_id in model_ids:
        if reasons[model_id]:
            replies.append(pb2.DeleteImageResponse(
                success=False, outcome=pb2.OUTCOME_INVALID_ARGUMENT,
                model_id=cut_for_reply(model_id), message=reasons[model_id]))
        elif failure:
            replies.append(pb2.DeleteImageResponse(
                success=False, outcome=failure[0], model_id=model_id, message=failure[1]))
        else:
            replies.append((preview_reply if dry_run else deletion_reply)(model_id, found[model_id]))
    return replies


def classify_failure(error):
    """The outcome and caller-safe message for a failed database call.

    The driver's own text stays in the server log (redacted): it can name
    hosts and users, and callers can do nothing with it.
    """
    unavailable = (pymongo.errors.ConnectionFailure, pymongo.errors.ExecutionTimeout)
    if isinstance(error, unavailable) or getattr(error, "timeout", False):
        return pb2.OUTCOME_UNAVAILABLE, "database unavailable or too slow; retry later"
    return pb2.OUTCOME_INTERNAL, "internal error while deleting; see the server log"


# ---------------------------------------------------------------------------
# The servicer
# ---------------------------------------------------------------------------


class ImageServiceServicer(pb2_grpc.ImageServiceServicer):
    """The ImageService methods of image_service.proto. Each runs the
    deletion on a database thread and awaits it, so the event loop stays
    free for other calls, health checks and reflection."""

    def __init__(self, db, mongo_timeout_s, database_threads, metrics):
        self._db = db
        self._mongo_timeout_s = mongo_timeout_s
        self._threads = database_threads
        self._metrics = metrics

    async def _delete(self, model_ids, dry_run, context):
        # The budget runs from now: time spent waiting for a free database
        # thread counts against it, as it does against the caller's deadline.
        remaining = context.time_remaining()
        budget = self._mongo_timeout_s if remaining is None else min(self._mongo_timeout_s, remaining)
        deadline = time.monotonic() + budget
        loop = asyncio.get_running_loop()
        replies = await loop.run_in_executor(
            self._threads, delete_and_describe, self._db, model_ids, deadline, dry_run)
        if not dry_run:
            self._metrics.count(replies)
        return replies

    async def DeleteImageByModelId(self, request, context):
        (reply,) = await self._delete([request.model_id], request.validate_only, context)
        CURRENT_CALL.get().summary = (
            f"{'dry_run ' if request.validate_only else ''}"
            f"outcome={pb2.Outcome.Name(reply.outcome)} deleted_images={reply.deleted_images}"
            f" deleted_files={reply.deleted_files}")
        return reply

    async def DeleteImagesByModelIds(self, request, context):
        if len(request.model_ids) > MAX_BATCH_SIZE:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"at most {MAX_BATCH_SIZE} model ids per call, got {len(request.model_ids)}")
        replies = await self._delete(list(request.model_ids), request.validate_only, context)
        outcomes = dict(collections.Counter(pb2.Outcome.Name(reply.outcome) for reply in replies))
        CURRENT_CALL.get().summary = (
            f"{'dry_run ' if request.validate_only else ''}outcomes={outcomes}"
            f" deleted_images={sum(r.deleted_images for r in replies)}"
            f" deleted_files={sum(r.deleted_files for r in replies)}")
        return pb2.DeleteImagesResponse(results=replies)


# ---------------------------------------------------------------------------
# Building and serving
# ---------------------------------------------------------------------------


def connect_to_mongo(config, event_listeners=()):
    """A client whose every wait is bounded by MONGO_TIMEOUT_MS, not the
    driver's 30 s default. It connects lazily, so start-up never blocks."""
    timeout_ms = int(config.mongo_timeout_s * 1000)
    return pymongo.MongoClient(
        config.mongo_uri,
        appname="image-service",
        serverSelectionTimeoutMS=timeout_ms,
        connectTimeoutMS=timeout_ms,
        connect=False,
        event_listeners=list(event_listeners),
    )


@dataclasses.dataclass
class RunningServer:
    """A started server: its gRPC server, bound port, health and admission."""

    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer
    monitor: MongoHealthMonitor
    admission: Admission
    database_threads: futures.Executor
    metrics_endpoint: object = None  # the HTTP server of /metrics, when on

    @property
    def metrics_port(self):
        return self.metrics_endpoint.server_port if self.metrics_endpoint else None

    async def stop(self, grace_s, delay_s=0.0):
        """The drain: NOT_SERVING at once; new calls still accepted for
        ``delay_s`` (so load balancers can notice); then none; calls in
        flight get ``grace_s`` to finish, and the rest are abandoned."""
        self.monitor.stop()
        await self.health.enter_graceful_shutdown()
        await asyncio.sleep(delay_s)
        self.admission.stopping = True
        await self.server.stop(grace_s)
        # Abandoned calls log as their cancellation reaches them.
        await self.admission.wait_idle(1.0)
        self.database_threads.shutdown(wait=False)  # A hung one ends within MONGO_TIMEOUT_MS.
        if self.metrics_endpoint:
            self.metrics_endpoint.shutdown()
            self.metrics_endpoint.server_close()


def _server_credentials(config):
    if config.tls_cert is None:
        return None
    return grpc.ssl_server_credentials(
        [(config.tls_key, config.tls_cert)],
        root_certificates=config.tls_client_ca,
        require_client_auth=config.tls_client_ca is not None,
    )


async def start_server(config, db, servicer=None, metrics=None):
    """Builds the server for ``db`` and starts it on the configured address
    (port 0 picks a free one), on the running event loop, with /metrics when
    METRICS_PORT is set. Returns it running; the caller stops it.
    ``servicer`` replaces the ImageService (the benchmark's no-op floor);
    ``metrics`` is given when the MongoDB client already feeds it."""
    metrics = metrics or Metrics()
    admission = Admission(config.max_concurrent_rpcs, metrics.calls_in_flight, SERVICE_NAME)
    # Outermost first: every call gets a request id and a log line, even one
    # refused for its token; only authorized ImageService calls are admitted.
    interceptors = [CallInterceptor(metrics.call_duration)]
    if config.auth_tokens:
        interceptors.append(BearerTokenInterceptor(config.auth_tokens))
    interceptors.append(admission)
    # A second instance on the same port must fail, not share it.
    server = grpc.aio.server(interceptors=interceptors, options=[("grpc.so_reuseport", 0)])
    database_threads = futures.ThreadPoolExecutor(max_workers=config.max_workers, thread_name_prefix="mongo")
    pb2_grpc.add_ImageServiceServicer_to_server(
        servicer or ImageServiceServicer(db, config.mongo_timeout_s, database_threads, metrics), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if config.reflection:
        names = (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, server)
    address = f"{host_in_uri(config.grpc_host)}:{config.grpc_port}"
    credentials = _server_credentials(config)
    port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    # NOT_SERVING until the first ping answers. Each ping waits at most an
    # interval, so a dead MongoDB shows as NOT_SERVING within two intervals.
    for service in ("", SERVICE_NAME):
        await health_servicer.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
    monitor = MongoHealthMonitor(health_servicer, ("", SERVICE_NAME), db, config.health_interval_s,
                                 min(config.health_interval_s, config.mongo_timeout_s), metrics.mongodb_up)
    await server.start()
    monitor.start()
    endpoint = None
    if config.metrics_port is not None:
        endpoint = start_metrics_endpoint(config.metrics_host, config.metrics_port, metrics.registry)
    return RunningServer(server, port, health_servicer, monitor, admission, database_threads, endpoint)


class BackgroundServer:
    """The server on an event loop of its own, in a thread: for embedding
    it in synchronous code (the tests, the benchmark, the load run)."""

    def __init__(self, config, db, servicer=None, metrics=None):
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="grpc-loop", daemon=True)
        self._thread.start()
        self.running = self.run(start_server(config, db, servicer, metrics))
        self.port = self.running.port

    def run(self, coroutine, timeout_s=None):
        """Runs a coroutine on the server's loop and returns its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout_s)

    def stop(self, grace_s=0.0, delay_s=0.0):
        """Drains as the process does at SIGTERM, then ends the loop; again: nothing."""
        if self._loop.is_running():
            self.run(self.running.stop(grace_s, delay_s))
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()


async def serve(config, db, database_description, metrics):
    """Serves until SIGTERM or SIGINT, then drains (see RunningServer.stop);
    a second signal during the drain exits at once."""
    loop = asyncio.get_running_loop()
    signals = asyncio.Queue()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, signals.put_nowait, signum)
    try:
        running = await start_server(config, db, metrics=metrics)
    except RuntimeError as error:  # gRPC's way of saying it cannot listen
        raise ConfigError(f"GRPC_PORT: cannot listen on {config.grpc_host}:{config.grpc_port}") from error
    tls = "mTLS" if config.tls_client_ca else "TLS" if config.tls_cert else "plaintext"
    log.info("serving %s on %s:%d (%s%s), database %s", SERVICE_NAME, config.grpc_host, running.port,
             tls, ", bearer tokens" if config.auth_tokens else "", database_description)
    if running.metrics_port is not None:
        log.info("metrics on http://%s:%d/metrics", config.metrics_host, running.metrics_port)
    await signals.get()
    log.info("shutting down: NOT_SERVING now, new calls accepted for %g s more, then calls in flight get"
             " up to %g s", config.shutdown_delay_s, config.shutdown_grace_s)
    drain = asyncio.ensure_future(running.stop(config.shutdown_grace_s, config.shutdown_delay_s))
    second_signal = asyncio.ensure_future(signals.get())
    await asyncio.wait((drain, second_signal), return_when=asyncio.FIRST_COMPLETED)
    if not drain.done():
        log.warning("second signal: exiting now, without waiting for calls in flight")
        running.admission.abandon_all()
    log.info("stopped")


# ---------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------



def parse_arguments(argv):
    """The command line: serve (the default), or one of the operator's tools."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--in-memory", action="store_true",
                        help="serve an in-memory MongoDB stand-in holding sample images (no MongoDB needed)")
    parser.add_argument("--create-indexes", action="store_true",
                        help="create the indexes deletes need (images.model_id, GridFS's on fs.chunks),"
                             " then exit")
    sweep.add_arguments(parser)
    args = parser.parse_args(argv)
    sweep.check_arguments(parser, args)
    if args.create_indexes and args.sweep_orphans:
        parser.error("--create-indexes and --sweep-orphans are separate runs")
    return args


def open_database(config, in_memory, event_listeners=()):
    """The database to serve, and how to describe it in the log."""
    if in_memory:
        return open_in_memory_database(config.mongo_db), f"in-memory stand-in/{config.mongo_db}"
    try:
        client = connect_to_mongo(config, event_listeners)
    except (pymongo.errors.ConfigurationError, ValueError) as error:  # The driver's words for a bad URI.
        raise ConfigError(f"MONGO_URI: {redact(str(error).splitlines()[0], config.secrets)}") from None
    return client[config.mongo_db], describe_database(config)


def main(argv=None):
    args = parse_arguments(argv)
    serving = not (args.sweep_orphans or args.create_indexes)
    metrics = Metrics()
    try:
        config = load_config(read_environment())
        if serving:
            check_listen_address(config.grpc_host, config.grpc_port)
            if config.metrics_port is not None:
                check_listen_address(config.metrics_host, config.metrics_port, prefix="METRICS")
        command_timer = CommandTimer(metrics.mongodb_command_duration)
        db, database_description = open_database(config, args.in_memory, [command_timer])
    except ConfigError as error:
        print(f"configuration error: {error}", file=sys.stderr)
        return 2
    configure_logging(config)
    dotenv_warning = dotenv_permission_warning()
    if dotenv_warning:
        log.warning("%s", dotenv_warning)
    if args.create_indexes:
        try:
            create_indexes(db)
        except pymongo.errors.PyMongoError as error:
            reason = redact(describe_failure(error), config.secrets)
            print(f"cannot create the indexes: {type(error).__name__}: {reason}", file=sys.stderr)
            return 1
        print(f"indexes present on {database_description}: images {{model_id: 1}},"
              " fs.chunks {files_id: 1, n: 1} (unique)")
        return 0
    if args.sweep_orphans:
        try:
            sweep.run_sweep(db, args)
        except pymongo.errors.PyMongoError as error:
            log.error("sweep failed, nothing more was changed: %s: %s", type(error).__name__,
                      describe_failure(error))
            log.debug("sweep: the driver said: %s", error)
            return 1
        return 0
    if args.in_memory:
        log.info("in-memory MongoDB stand-in with sample models %s; try: .venv/bin/python"
                 " image_service_client.py %s --address 127.0.0.1:%d",
                 ", ".join(SAMPLE_MODELS), next(iter(SAMPLE_MODELS)), config.grpc_port)
    try:
        asyncio.run(serve(config, db, database_description, metrics))
    except ConfigError as error:
        print(f"configuration error: {error}", file=sys.stderr)
        return 2
    return 0


def exit_now(code):
    """Exits without waiting for database threads: a delete abandoned at
    shutdown may still be waiting on MongoDB (up to MONGO_TIMEOUT_MS), and
    the interpreter would join its thread. Its work is safe to abandon."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_now(main())
