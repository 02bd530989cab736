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
- ``image_service_store.py``: what the upload service writes, which
  documents are a model's, how an ``image_id`` names a GridFS file, what a
  read of ``images`` holds, the indexes, opening the database (reads on the
  primary), the in-memory sample store;
- ``image_service_replies.py``: which ids are refused, each model's account
  of a delete, and the reply messages and outcomes built from it;
- ``image_service_tools.py``: the operator's tools on the command line
  (``--create-indexes``, ``--sweep-orphans``), and
  ``image_service_sweep.py``: what the orphan sweep finds and removes;
- ``image_service_background.py``: the server in a thread of its own, for
  the tests, the benchmark and the load run;
- ``image_service_console.py``: the command line's words (``--help``'s
  settings, the in-memory hint, the tools' failures, configuration errors);
- ``image_service_tracing.py``: opt-in OpenTelemetry tracing;
- ``image_service_pb2*.py``: generated from ``image_service.proto``.

Run ``.venv/bin/python image_service_server.py --help`` for the command line.
"""

import argparse
import asyncio
import collections
import dataclasses
import functools
import logging
import os
import signal
import sys
import time

# gRPC's own log lines (one per failed TLS handshake, say) go to stderr
# outside our log format, and any client can cause them: errors only, unless
# the operator asks for more. gRPC reads this once, when it is imported.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import grpc
import pymongo
import pymongo.errors
import uvloop
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

import image_service_pb2 as pb2
import image_service_pb2_grpc as pb2_grpc
import image_service_tools as tools
from image_service_calls import CURRENT_CALL, Admission, BearerTokenInterceptor, CallInterceptor
from image_service_console import SETTINGS_HELP, in_memory_hint, report_configuration_error
from image_service_observability import (
    CommandTimer,
    Metrics,
    MongoHealthMonitor,
    configure_logging,
    describe_failure,
    start_metrics_endpoint,
)
from image_service_replies import Ending, ModelImages, RequestedModels, classify_failure, credit
from image_service_settings import (
    ConfigError,
    check_listen_address,
    check_listeners_apart,
    dotenv_permission_warning,
    host_in_uri,
    load_config,
    read_environment,
    server_credentials,
)
from image_service_store import (
    ImagesRead,
    images_of,
    images_of_other_models,
    in_batches,
    open_database,
    read_collation,
    referenced_file_id,
    references_filter,
    stored_file_ids,
    stored_model_id_forms,
)
from image_service_tracing import TracingOff, start_tracing

log = logging.getLogger("image_service")

SERVICE_NAME = pb2.DESCRIPTOR.services_by_name["ImageService"].full_name

# ---------------------------------------------------------------------------
# The deletion
# ---------------------------------------------------------------------------
#
# A call's deletion works in rounds, each whole in itself: read up to
# ROUND_SIZE ``images`` documents of the call's models; keep the files that
# an image of another model still references; delete the other files
# (``fs.files``, then ``fs.chunks``, as GridFS does), then the documents read
# (by ``_id`` and model); look once more at the files kept, and delete those that
# nothing references any more; last, read what is left (sent with the
# documents' delete when the round was small and kept none). Files go before
# the metadata, so after any failure the metadata still points at what a
# retry must finish. Rounds go on until a read finds nothing left, and only
# then does a reply say success; when the time budget runs out first, the
# reply says how much was removed and that more remains, and the next call
# goes on from there. Each call deletes on its own: its reply depends on its
# call and the database.

MAX_BATCH_SIZE = 1000
# Images per round. The largest command of a round, the reference check,
# carries 5 spellings per file: about 1.2 MB for 10,000 files, far below
# MongoDB's 16 MB; and a round stays well within the default 5 s budget.
ROUND_SIZE = 10_000
# The part of a caller's deadline kept for the reply, at least.
REPLY_MARGIN_S = 0.05
# A dry run reads every document at once, this many per reply.
READ_BATCH_SIZE = 100_000


class Deletion:
    """One call's deletion of its models (distinct, valid ids) before
    ``deadline`` (on ``time.monotonic()``): ``run`` removes them round by
    round, ``preview`` says what it would remove. ``found`` holds each
    model's account, as MongoDB reported each command, so a failure midway
    still counts what went before it."""

    def __init__(self, db, model_ids: list[str], deadline: float, round_size: int = ROUND_SIZE):
        self.found = {model_id: ModelImages() for model_id in model_ids}
        self._db = db
        self._model_ids = model_ids
        self._deadline = deadline
        self._round_size = round_size
        self._forms_to_models = {form: model_id for model_id in model_ids
                                 for form in stored_model_id_forms(model_id)}
        self._forms = list(self._forms_to_models)
        self._deleted_earlier = {}  # file id -> the model counted for it, over the rounds
        self._kept = collections.defaultdict(set)  # model id -> the files kept for it, over the rounds
        self._slowest_round = 0.0

    async def run(self) -> bool:
        """Removes every image of the models. True once a read finds none
        left; False when, after a full round, more are left and less of the
        budget remains than twice the slowest round so far."""
        started = time.monotonic()
        read = await self._read(limit=self._round_size)
        while read.metadata_ids:
            was_full = read.size() == self._round_size
            read = await self.remove_round(read)
            ended = time.monotonic()
            # A round runs from its read to the next.
            self._slowest_round = max(self._slowest_round, ended - started)
            started = ended
            if read.metadata_ids and was_full and self._deadline - ended < 2 * self._slowest_round:
                return False
        return True

    async def remove_round(self, read: ImagesRead) -> ImagesRead:
        """Deletes what one read found: the files no other model references,
        their chunks, then the documents read; then the files it kept, if
        nothing references them now. Returns what is left, read after the
        delete or with it."""
        model_ids = [model_id for model_id in self._model_ids if read.metadata_ids[model_id]]
        owners = read.file_owners(model_ids)
        candidates = [file_id for file_id in owners if file_id not in self._deleted_earlier]
        kept = await self._referenced_elsewhere(candidates)
        self._count_read(read, model_ids, owners, kept)
        doomed = [file_id for file_id in candidates if file_id not in kept]
        await self._delete_files(doomed, owners, model_ids)
        # A round that was not full and kept no file is most likely the
        # last: the read of what is left goes with its images delete.
        likely_last = read.size() < self._round_size and not kept
        left = await self._delete_metadata(read, model_ids, read_with_it=likely_last)
        if kept:
            # Two calls deleting the last two models that share a file each
            # see the other's image and keep it; the later of them finds
            # no reference here, and the file goes with the last image.
            unreferenced = kept - await self._referenced_elsewhere(list(kept))
            for model_id in model_ids:
                self._kept[model_id] -= unreferenced
                self.found[model_id].kept_files = len(self._kept[model_id])
            await self._delete_files(list(unreferenced), owners, model_ids)
        if left is None:
            left = await self._read(limit=self._round_size)
            self._uncount_found_again(read, left, model_ids)
        return left

    async def preview(self) -> None:
        """What ``run`` would remove now, without writing: one read of every
        document, the reference check, and the lengths of the files that
        would go (one read per round's worth of files)."""
        read = await self._read()
        owners = read.file_owners(self._model_ids)
        kept = await self._referenced_elsewhere(list(owners))
        lengths, existing = collections.Counter(), set()
        for batch in in_batches([file_id for file_id in owners if file_id not in kept], self._round_size):
            files = self._db["fs.files"].find({"_id": {"$in": stored_file_ids(batch)}}, {"length": 1},
                                              collation=await read_collation(self._db, "fs.files"))
            async for file in files:
                lengths[referenced_file_id(file["_id"])] += int(file.get("length") or 0)
                existing.add(referenced_file_id(file["_id"]))
        for model_id in self._model_ids:
            images = self.found[model_id]
            own = {file_id for file_id in existing if owners[file_id] == model_id}
            images.found_images = images.deleted_images = len(read.metadata_ids[model_id])
            images.deleted_files = len(own)
            images.kept_files = len(read.file_ids[model_id] & kept)
            images.file_bytes = sum(lengths[file_id] for file_id in own)

    async def _read(self, limit: int = 0, excluding: list = ()) -> ImagesRead:
        """The models' ``images`` documents but those of ``_id`` in
        ``excluding``, up to ``limit`` (0: all), in one ``find``."""
        read = ImagesRead()
        query = images_of(self._forms)
        if excluding:
            query["_id"] = {"$nin": excluding}
        cursor = self._db.images.find(query, {"model_id": 1, "image_id": 1}, limit=limit,
                                      batch_size=limit or READ_BATCH_SIZE,
                                      collation=await read_collation(self._db))
        async for document in cursor:
            read.add(self._forms_to_models[document["model_id"]], document)
        return read

    async def _referenced_elsewhere(self, file_ids: list) -> set:
        """Those of ``file_ids`` that an ``images`` document of another model
        references, in any spelling: one ``aggregate`` by the ``image_id``
        index per round's worth of files, answering each spelling once,
        however many images share a file (a placeholder may be shared by
        millions)."""
        referenced = set()
        for batch in in_batches(file_ids, self._round_size):
            pipeline = [{"$match": {"$and": [references_filter(batch), images_of_other_models(self._forms)]}},
                        {"$group": {"_id": "$image_id"}}]
            references = await self._db.images.aggregate(pipeline, collation=await read_collation(self._db))
            async for spelling in references:
                referenced.add(referenced_file_id(spelling["_id"]))
        return referenced & set(file_ids)

    def _count_read(self, read, model_ids, owners, kept):
        """Adds to each model's account what a round's read found of it."""
        for model_id in model_ids:
            images = self.found[model_id]
            images.found_images += len(read.metadata_ids[model_id])
            images.invalid_references += read.invalid_references[model_id]
            self._kept[model_id] |= read.file_ids[model_id] & kept  # once, however many rounds keep it
            images.kept_files = len(self._kept[model_id])
            # A file named by two models of the batch is counted with one of them.
            counted_with = [self._deleted_earlier.get(file_id, owners[file_id])
                            for file_id in read.file_ids[model_id] - kept]
            images.files_counted_earlier += sum(1 for counted in counted_with if counted != model_id)

    def _uncount_found_again(self, read, left, model_ids):
        """A document the delete named and the read after it finds again was
        missed (a multi-delete racing a chunk migration can miss one), not
        removed by another deleter: it is counted when a round deletes it."""
        for model_id in model_ids:
            named = {repr(doc_id) for doc_id in read.metadata_ids[model_id]}
            again = sum(1 for doc_id in left.metadata_ids.get(model_id, ()) if repr(doc_id) in named)
            self.found[model_id].found_images -= again

    async def _delete_metadata(self, read, model_ids, read_with_it):
        """Deletes the documents read (by ``_id`` and model), each counted with its
        model. With ``read_with_it``, the read of what is left is sent at
        once, leaving them out: one wait less. Returns what that read found,
        or None when a read after the delete must tell: none was sent, or
        the delete removed fewer than it named, so that some it left out
        may still be there."""
        metadata_ids = [doc_id for model_id in model_ids for doc_id in read.metadata_ids[model_id]]
        wanted = [len(read.metadata_ids[model_id]) for model_id in model_ids]
        # By exact _id, as the read compared: a case-insensitive default
        # collation would also match another model's string _id. And only
        # while still the models': an _id is unique on one server, not
        # across a sharded cluster's shards.
        removal = self._db.images.delete_many({"_id": {"$in": metadata_ids}, **images_of(self._forms)},
                                              collation=await read_collation(self._db))
        if not read_with_it:
            credit(self.found, model_ids, wanted, (await removal).deleted_count, "deleted_images")
            return None
        removal, left = await asyncio.gather(
            removal, self._read(limit=self._round_size, excluding=metadata_ids), return_exceptions=True)
        if isinstance(removal, BaseException):
            if isinstance(left, BaseException):
                log.debug("the read sent with the failed delete failed too: %s: %s", type(left).__name__,
                          describe_failure(left))
            raise removal
        credit(self.found, model_ids, wanted, removal.deleted_count, "deleted_images")
        if isinstance(left, BaseException):
            raise left
        return left if removal.deleted_count == len(metadata_ids) else None

    async def _delete_files(self, file_ids, owners, model_ids):
        """Deletes these files and their chunks, each counted with its owner."""
        if not file_ids:
            return
        self._deleted_earlier.update((file_id, owners[file_id]) for file_id in file_ids)
        stored_ids = stored_file_ids(file_ids)
        files = self._db["fs.files"].delete_many({"_id": {"$in": stored_ids}},
                                                 collation=await read_collation(self._db, "fs.files"))
        removed = (await files).deleted_count
        removed = min(removed, len(file_ids))  # a file stored under two spellings of its id is one file
        wanted = [sum(1 for file_id in file_ids if owners[file_id] == model_id) for model_id in model_ids]
        shortfalls = credit(self.found, model_ids, wanted, removed, "deleted_files")
        for model_id, missing in zip(model_ids, shortfalls, strict=True):
            self.found[model_id].missing_files += max(missing, 0)
        await self._db["fs.chunks"].delete_many({"files_id": {"$in": stored_ids}},
                                                collation=await read_collation(self._db, "fs.chunks"))


async def delete_and_describe(db, requested: RequestedModels, deadline: float, dry_run: bool = False,
                              round_size: int = ROUND_SIZE) -> list[pb2.DeleteImageResponse]:
    """One reply per id the call names, in order. Invalid ids are answered
    without touching anything; the valid ones are deleted together (in a dry
    run, previewed) before ``deadline`` (on ``time.monotonic()``), each once
    however often it is named; a database failure is reported on each, with
    what was removed before it."""
    deletion = Deletion(db, requested.valid, deadline, round_size)
    ending = Ending(finished=True)
    try:
        timeout_s = deadline - time.monotonic()
        if requested.valid and timeout_s <= 0:
            raise pymongo.errors.ExecutionTimeout("the call's deadline passed before the database was asked")
        with pymongo.timeout(timeout_s):
            if requested.valid and dry_run:
                await deletion.preview()
            elif requested.valid:
                ending = Ending(finished=await deletion.run())
    except Exception as error:  # Reported to the caller; the server goes on.
        log.warning("delete of %d model(s) failed request_id=%s: %s: %s", len(requested.valid),
                    requested.request_id, type(error).__name__, describe_failure(error))
        log.debug("request_id=%s the driver said: %s", requested.request_id, error)
        ending = Ending(finished=False, failure=classify_failure(error))
    return requested.replies(deletion.found, dry_run, ending)


# ---------------------------------------------------------------------------
# The servicer
# ---------------------------------------------------------------------------


class ImageServiceServicer(pb2_grpc.ImageServiceServicer):
    """The ImageService methods of image_service.proto. The deletion runs on
    the event loop with pymongo's asyncio client: while it waits on MongoDB
    the loop serves other calls, health checks and reflection. At most
    ``max_deletions`` (MAX_CONCURRENT_DELETIONS) calls' deletions talk to
    MongoDB at once; the others wait their turn, their budget running."""

    def __init__(self, db, mongo_timeout_s: float, max_deletions: int, metrics: Metrics,
                 round_size: int = ROUND_SIZE):
        self._db = db
        self._mongo_timeout_s = mongo_timeout_s
        self._deletions_at_once = asyncio.Semaphore(max_deletions)
        self._metrics = metrics
        self._round_size = round_size
        self.unfinished = set()  # deletions still running, their callers gone or not

    async def _delete(self, model_ids: list[str], dry_run: bool, context) -> list[pb2.DeleteImageResponse]:
        # The budget runs from now: time spent waiting for the database
        # counts against it, as it does against the caller's deadline.
        remaining = context.time_remaining()
        budget = self._mongo_timeout_s
        if remaining is not None:
            # Stop short of the caller's deadline, so the reply saying what
            # was removed still reaches it.
            budget = min(budget, remaining - max(REPLY_MARGIN_S, remaining / 10))
        requested = RequestedModels(model_ids, CURRENT_CALL.get().request_id)
        deadline = time.monotonic() + budget
        deletion = asyncio.ensure_future(self._delete_and_count(requested, deadline, dry_run))
        self.unfinished.add(deletion)
        deletion.add_done_callback(self.unfinished.discard)
        # A caller that hangs up does not stop the deletion: it ends within
        # its budget, whole rounds and all, and is counted.
        return await asyncio.shield(deletion)

    async def _delete_and_count(self, requested, deadline, dry_run):
        async with self._deletions_at_once:
            replies = await delete_and_describe(self._db, requested, deadline, dry_run, self._round_size)
        if not dry_run:
            self._metrics.count(replies)
        return replies

    async def DeleteImageByModelId(self, request, context):
        (reply,) = await self._delete([request.model_id], request.validate_only, context)
        return reply

    async def DeleteImagesByModelIds(self, request, context):
        if len(request.model_ids) > MAX_BATCH_SIZE:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"at most {MAX_BATCH_SIZE} model ids per call, got {len(request.model_ids)}")
        replies = await self._delete(list(request.model_ids), request.validate_only, context)
        return pb2.DeleteImagesResponse(results=replies)


# ---------------------------------------------------------------------------
# Building and serving
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class RunningServer:
    """A started server: its gRPC server, bound port, health and admission."""

    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer
    monitor: MongoHealthMonitor
    admission: Admission
    deletions: set  # still running, their callers gone or not
    metrics_endpoint: object = None  # the HTTP server of /metrics, when on
    hurried: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)

    @property
    def metrics_port(self):
        return self.metrics_endpoint.server_port if self.metrics_endpoint else None

    async def stop(self, grace_s, delay_s=0.0):
        """The drain: NOT_SERVING at once; new calls still accepted for
        ``delay_s`` (so load balancers can notice); then none; calls in
        flight get ``grace_s`` to finish, and the rest are abandoned.
        ``hurried`` (a second signal) cuts the delay and the grace short."""
        self.monitor.stop()
        await self.health.enter_graceful_shutdown()
        hurried = asyncio.ensure_future(self.hurried.wait())
        await asyncio.wait((hurried,), timeout=delay_s)
        self.admission.stopping = True
        graceful = asyncio.ensure_future(self.server.stop(grace_s))
        await asyncio.wait((graceful, hurried), return_when=asyncio.FIRST_COMPLETED)
        hurried.cancel()
        # When hurried, the calls still in flight are cancelled now (gRPC's
        # stop may be called again with a shorter grace); otherwise, nothing.
        await self.server.stop(None)
        await graceful
        # Abandoned calls log as their cancellation reaches them.
        await self.admission.wait_idle(1.0)
        for deletion in list(self.deletions):  # safe to abandon: files go before metadata
            deletion.cancel()
        if self.metrics_endpoint:
            self.metrics_endpoint.shutdown()
            self.metrics_endpoint.server_close()


async def start_server(config, db, servicer=None, metrics=None, tracing=None):
    """Builds the server for ``db`` and starts it on the configured address
    (port 0 picks a free one), on the running event loop, with /metrics when
    METRICS_PORT is set. Returns it running; the caller stops it.
    ``servicer`` replaces the ImageService (the benchmark's no-op floor);
    ``metrics`` is given when the MongoDB client already feeds it;
    ``tracing``, when on, puts its span around each call."""
    metrics = metrics or Metrics()
    tracing = tracing or TracingOff()
    admission = Admission(config.max_concurrent_rpcs, metrics.calls_in_flight, SERVICE_NAME)
    # Outermost first: every call gets a request id and a log line, even one
    # refused for its token; only authorized ImageService calls are admitted.
    interceptors = [*tracing.interceptors, CallInterceptor(metrics.call_duration, tracing.call_observer)]
    if config.auth_tokens:
        interceptors.append(BearerTokenInterceptor(config.auth_tokens))
    interceptors.append(admission)
    # A second instance on the same port must fail, not share it.
    server = grpc.aio.server(interceptors=interceptors, options=[("grpc.so_reuseport", 0)])
    servicer = servicer or ImageServiceServicer(db, config.mongo_timeout_s, config.max_concurrent_deletions,
                                                metrics)
    pb2_grpc.add_ImageServiceServicer_to_server(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if config.reflection:
        names = (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, server)
    address = f"{host_in_uri(config.grpc_host)}:{config.grpc_port}"
    credentials = server_credentials(config)
    port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    # NOT_SERVING until the first ping answers. Each ping waits at most an
    # interval, so a dead MongoDB shows as NOT_SERVING within two intervals.
    for service in ("", SERVICE_NAME):
        await health_servicer.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
    monitor = MongoHealthMonitor(health_servicer, ("", SERVICE_NAME), db, config.health_interval_s,
                                 min(config.health_interval_s, config.mongo_timeout_s), metrics.mongodb_up,
                                 index_check_timeout_s=config.mongo_timeout_s)
    await server.start()
    monitor.start()
    endpoint = None
    if config.metrics_port is not None:
        endpoint = start_metrics_endpoint(config.metrics_host, config.metrics_port, metrics.registry)
    deletions = getattr(servicer, "unfinished", set())
    return RunningServer(server, port, health_servicer, monitor, admission, deletions, endpoint)


async def serve(config, db, database_description, metrics, hint=None, tracing=None):
    """Serves until SIGTERM or SIGINT, then drains (see RunningServer.stop);
    a second signal during the drain exits at once. ``hint(port)``, if
    given, is logged once listening: what to try against the bound port."""
    loop = asyncio.get_running_loop()
    signals = asyncio.Queue()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, signals.put_nowait, signum)
    try:
        running = await start_server(config, db, metrics=metrics, tracing=tracing)
    except RuntimeError as error:  # gRPC's way of saying it cannot listen
        raise ConfigError(f"GRPC_PORT: cannot listen on {config.grpc_host}:{config.grpc_port}") from error
    tls = "mTLS" if config.tls_client_ca else "TLS" if config.tls_cert else "plaintext"
    log.info("serving %s on %s:%d (%s%s), database %s", SERVICE_NAME, config.grpc_host, running.port,
             tls, ", bearer tokens" if config.auth_tokens else "", database_description)
    if running.metrics_port is not None:
        log.info("metrics on http://%s:%d/metrics", config.metrics_host, running.metrics_port)
    if hint:
        log.info("%s", hint(running.port))
    await signals.get()
    log.info("shutting down: NOT_SERVING now, new calls accepted for %g s more, then calls in flight get"
             " up to %g s", config.shutdown_delay_s, config.shutdown_grace_s)
    drain = asyncio.ensure_future(running.stop(config.shutdown_grace_s, config.shutdown_delay_s))
    second_signal = asyncio.ensure_future(signals.get())
    await asyncio.wait((drain, second_signal), return_when=asyncio.FIRST_COMPLETED)
    if not drain.done():
        log.warning("second signal: exiting now, without waiting for calls in flight")
        running.hurried.set()  # the drain cancels the calls in flight now, each logged as it ends
        await asyncio.wait((drain,), timeout=2.0)
        running.admission.abandon_all()  # any its cancellation has not reached yet
    second_signal.cancel()
    log.info("stopped")


# ---------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------


def parse_arguments(argv):
    """The command line: serve (the default), or one of the operator's tools."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=SETTINGS_HELP)
    parser.add_argument("--env-file", metavar="PATH",
                        help="read settings from PATH instead of ./.env, with the same rules (e.g. the"
                             " systemd unit's /etc/image-service/env)")
    parser.add_argument("--in-memory", action="store_true",
                        help="serve an in-memory MongoDB stand-in holding sample images (no MongoDB needed)")
    tools.add_arguments(parser)
    args = parser.parse_args(argv)
    tools.check_arguments(parser, args)
    return args


def main(argv=None):
    args = parse_arguments(argv)
    serving = not tools.asked_for(args)
    metrics = Metrics()
    env = os.environ
    try:
        env = read_environment(args.env_file or ".env", required=args.env_file is not None)
        config = load_config(env)
        if serving:
            check_listen_address(config.grpc_host, config.grpc_port)
            if config.metrics_port is not None:
                check_listen_address(config.metrics_host, config.metrics_port, prefix="METRICS")
                check_listeners_apart(config)
        tracing = start_tracing(env) if serving else TracingOff()
        listeners = [CommandTimer(metrics.mongodb_command_duration), *tracing.command_listeners]
        db, database_description = open_database(config, args.in_memory, listeners, serving)
    except ConfigError as error:
        report_configuration_error(error, env)
        return 2
    configure_logging(config)
    dotenv_warning = dotenv_permission_warning(args.env_file or ".env")
    if dotenv_warning:
        log.warning("%s", dotenv_warning)
    if not serving:
        return tools.run(args, db, database_description)
    hint = functools.partial(in_memory_hint, config) if args.in_memory else None
    try:
        # libuv's event loop: about a tenth less CPU per delete than asyncio's own (docs/performance.md)
        uvloop.run(serve(config, db, database_description, metrics, hint, tracing))
    except ConfigError as error:
        report_configuration_error(error, env)
        return 2
    finally:
        tracing.shutdown()
    return 0


def exit_now(code):
    """Exits without waiting for anything the drain abandoned (a driver
    thread still waiting on a hung MongoDB, say): its work is safe to
    abandon, files going before metadata."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_now(main())
