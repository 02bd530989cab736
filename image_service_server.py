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
  ``image_id`` names a GridFS file, the indexes, opening the database (reads
  on the primary), the in-memory sample store;
- ``image_service_turns.py``: how delete calls take turns at the database,
  and share them under load;
- ``image_service_replies.py``: which ids are refused, each model's account
  of a delete, and the reply messages and outcomes built from it;
- ``image_service_sweep.py``: the orphan sweep (``--sweep-orphans``);
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
import threading
import time

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
from pymongo.collation import Collation

import image_service_pb2 as pb2
import image_service_pb2_grpc as pb2_grpc
import image_service_sweep as sweep
from image_service_calls import CURRENT_CALL, Admission, BearerTokenInterceptor, CallInterceptor
from image_service_console import SETTINGS_HELP, in_memory_hint, report_configuration_error, tool_failure
from image_service_observability import (
    CommandTimer,
    Metrics,
    MongoHealthMonitor,
    configure_logging,
    describe_failure,
    start_metrics_endpoint,
)
from image_service_replies import Call, ModelImages, classify_failure, credit
from image_service_settings import (
    ConfigError,
    check_listen_address,
    check_listeners_apart,
    dotenv_permission_warning,
    host_in_uri,
    load_config,
    read_environment,
)
from image_service_store import (
    create_indexes,
    describe_indexes,
    gridfs_file_key,
    in_batches,
    open_database,
    referenced_file_id,
    references_filter,
    stored_file_ids,
)
from image_service_tracing import TracingOff, start_tracing
from image_service_turns import Turns, WaitingCall

log = logging.getLogger("image_service")

SERVICE_NAME = pb2.DESCRIPTOR.services_by_name["ImageService"].full_name

# ---------------------------------------------------------------------------
# The deletion
# ---------------------------------------------------------------------------
#
# A delete works in rounds, each whole in itself: read up to ROUND_SIZE
# ``images`` documents of the models; keep the files that an image of
# another model still references; delete the other files (``fs.files``, then
# ``fs.chunks``, as GridFS does), then the documents read (by ``_id``). Files
# go before the metadata, so after any failure the metadata still points at
# what a retry must finish. Rounds go on until a read finds nothing left,
# and only then does a reply say success; when the time budget runs out
# first, the reply says how much was removed and that more remains, and the
# next call goes on from there.

MAX_BATCH_SIZE = 1000
# Images per round. The largest command of a round, the reference check,
# carries 5 spellings per file: about 1.2 MB for 10,000 files, far below
# MongoDB's 16 MB; and a round stays well within the default 5 s budget.
ROUND_SIZE = 10_000
# The part of a caller's deadline kept for the reply, at least.
REPLY_MARGIN_S = 0.05
# Calls of a shared turn going on alone at once, after a full round.
ALONE_AT_ONCE = 10
# A failure's log line names this many of the calls that shared the turn.
LOGGED_REQUEST_IDS = 20
# A dry run reads every document at once, this many per reply.
READ_BATCH_SIZE = 100_000
# Reads compare strings exactly, whatever default collation a collection
# was created with: a case-insensitive one would read "Chair" for "chair".
EXACT = Collation("simple")


def stored_model_id_forms(model_id):
    """The values ``images.model_id`` may hold for this model: the string,
    and also the ObjectId when the string is one's canonical (lower-case hex)
    spelling. Matching is exact: no trimming, case folding or patterns."""
    forms = [model_id]
    if ObjectId.is_valid(model_id) and str(ObjectId(model_id)) == model_id:
        forms.append(ObjectId(model_id))
    return forms


def forms_to_models_of(model_ids):
    """Each value ``images.model_id`` may hold for these models, mapped to
    its model id."""
    return {form: model_id for model_id in model_ids for form in stored_model_id_forms(model_id)}


def images_of(forms):
    """The filter for the ``images`` documents whose ``model_id`` is one of
    ``forms``: equal to it, not an array that merely contains it (such a
    document is another model's)."""
    return {"model_id": {"$in": forms, "$not": {"$type": "array"}}}


def images_of_other_models(forms):
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

    def file_owners(self, model_ids):
        """Each file named, with the first of ``model_ids`` naming it: a file
        two models of a batch share is counted once, with the first."""
        owners = {}
        for model_id in model_ids:
            for file_id in self.file_ids[model_id]:
                owners.setdefault(file_id, model_id)
        return owners


async def read_images(db, forms_to_models, limit=0):
    """The ``images`` documents of the models (``forms_to_models`` maps each
    stored form of a model id to the id), up to ``limit`` (0: all) in one
    ``find``."""
    read = ImagesRead()
    cursor = db.images.find(images_of(list(forms_to_models)), {"model_id": 1, "image_id": 1},
                            limit=limit, batch_size=limit or READ_BATCH_SIZE, collation=EXACT)
    async for document in cursor:
        read.add(forms_to_models[document["model_id"]], document)
    return read


async def files_referenced_elsewhere(db, file_ids, forms):
    """Those of ``file_ids`` that an ``images`` document of another model
    references, in any spelling: one ``aggregate`` by the ``image_id`` index
    per ROUND_SIZE files, answering each spelling once, however many images
    share a file (a placeholder image may be shared by millions)."""
    referenced = set()
    for batch in in_batches(file_ids, ROUND_SIZE):
        pipeline = [{"$match": {"$and": [references_filter(batch), images_of_other_models(forms)]}},
                    {"$group": {"_id": "$image_id"}}]
        async for spelling in await db.images.aggregate(pipeline, collation=EXACT):
            referenced.add(referenced_file_id(spelling["_id"]))
    return referenced & set(file_ids)


async def remove_round(db, read, forms, found, deleted_earlier):
    """Deletes what one read found: the files no other model references,
    their chunks, then the documents read. Adds to ``found`` what MongoDB
    reports removed, command by command, so a failure midway still counts
    what went before it. ``deleted_earlier`` maps the files the call's
    earlier rounds deleted to the model counted for each; this round's are
    added."""
    model_ids = [model_id for model_id in found if read.metadata_ids[model_id]]
    owners = read.file_owners(model_ids)
    candidates = [file_id for file_id in owners if file_id not in deleted_earlier]
    kept = await files_referenced_elsewhere(db, candidates, forms) if candidates else set()
    doomed = [file_id for file_id in candidates if file_id not in kept]
    for model_id in model_ids:
        images = found[model_id]
        images.found_images += len(read.metadata_ids[model_id])
        images.invalid_references += read.invalid_references[model_id]
        images.kept_files += len(read.file_ids[model_id] & kept)
        # A file named by two models of the batch is counted with one of them.
        counted_with = [deleted_earlier.get(file_id, owners[file_id])
                        for file_id in read.file_ids[model_id] - kept]
        images.files_counted_earlier += sum(1 for counted in counted_with if counted != model_id)
    deleted_earlier.update((file_id, owners[file_id]) for file_id in doomed)
    if doomed:
        stored_ids = stored_file_ids(doomed)
        removed = (await db["fs.files"].delete_many({"_id": {"$in": stored_ids}})).deleted_count
        wanted = [sum(1 for file_id in doomed if owners[file_id] == model_id) for model_id in model_ids]
        for model_id, missing in zip(model_ids, credit(found, model_ids, wanted, removed, "deleted_files"),
                                     strict=True):
            found[model_id].missing_files += max(missing, 0)
        await db["fs.chunks"].delete_many({"files_id": {"$in": stored_ids}})
    metadata_ids = [doc_id for model_id in model_ids for doc_id in read.metadata_ids[model_id]]
    removed = (await db.images.delete_many({"_id": {"$in": metadata_ids}})).deleted_count
    credit(found, model_ids, [len(read.metadata_ids[model_id]) for model_id in model_ids], removed,
           "deleted_images")


@dataclasses.dataclass
class Rounds:
    """What a deletion's rounds carry from one to the next."""

    deleted_earlier: dict = dataclasses.field(default_factory=dict)  # file id -> the model counted for it
    slowest: float = 0.0
    last_was_full: bool = False
    on_full_round: object = None  # called after each full round

    def carried_on(self):
        """The rounds of a deletion going on from this one with some of its
        models: what was deleted and the slowest round carry over, and it
        reads at least once."""
        return dataclasses.replace(self, deleted_earlier=dict(self.deleted_earlier), last_was_full=False)


async def delete_images_of_models(db, model_ids, found, deadline, rounds=None, stop_when_full=False,
                                  deleted_alongside=()):
    """Removes every image of the models, round by round, adding to
    ``found`` what each round removed. Returns True once a read finds none
    left, False when too little of the budget (``deadline``, on
    ``time.monotonic()``) remains for another full round: twice the slowest
    so far; with ``stop_when_full``, False after the first full round.
    ``rounds`` carries on from an earlier deletion of the same models; the
    images of ``deleted_alongside`` (models being deleted at the same time)
    keep no file."""
    forms_to_models = forms_to_models_of(model_ids)
    forms = list(forms_to_models_of([*model_ids, *deleted_alongside]))
    rounds = rounds or Rounds()
    while not (rounds.last_was_full and deadline - time.monotonic() < 2 * rounds.slowest):
        started = time.monotonic()
        read = await read_images(db, forms_to_models, limit=ROUND_SIZE)
        if not read.metadata_ids:
            return True
        await remove_round(db, read, forms, found, rounds.deleted_earlier)
        rounds.slowest = max(rounds.slowest, time.monotonic() - started)
        rounds.last_was_full = sum(map(len, read.metadata_ids.values())) == ROUND_SIZE
        if rounds.last_was_full and rounds.on_full_round:
            rounds.on_full_round()
        if rounds.last_was_full and stop_when_full:
            return False
    return False


async def delete_images_of_calls(db, calls, found, deadline, on_full_round=None, on_ended=None):
    """Removes the models of several calls together: the same rounds, one
    set of commands for all of them (their models are distinct). A full
    round may hold one model's images only, which every other call would
    wait behind: from there each call goes on alone, ALONE_AT_ONCE at a time
    (the others' images keep no file: they are going too). A call goes on
    only with at least a round's time left; otherwise its time ran out.
    Returns each call's ending: whether none of its images is left, and its
    failure (None, or the reply's outcome and message). ``on_full_round``
    is called after every full round; ``on_ended(call, ending)`` as each
    call going on alone ends, so it can be answered then."""
    rounds = Rounds(on_full_round=on_full_round)
    together = [model_id for call in calls for model_id in call.valid]
    if await delete_images_of_models(db, together, found, deadline, rounds, stop_when_full=len(calls) > 1):
        return [(True, None)] * len(calls)
    if len(calls) == 1:
        return [(False, None)]
    turns_alone = asyncio.Semaphore(ALONE_AT_ONCE)

    async def go_on_alone(call):
        async with turns_alone:
            try:
                finished = deadline - time.monotonic() >= rounds.slowest and await delete_images_of_models(
                    db, call.valid, found, deadline, rounds.carried_on(), deleted_alongside=together)
                ending = (finished, None)
            except Exception as error:  # Reported to this call; the others go on.
                ending = (True, failure_reported(error, [call]))
        if on_ended:
            on_ended(call, ending)
        return ending

    return await asyncio.gather(*(go_on_alone(call) for call in calls))


async def preview_images_of_models(db, model_ids, found):
    """What delete_images_of_models would remove now, without writing: one
    read of every document, the reference check, and the lengths of the
    files that would go (one read per ROUND_SIZE files)."""
    forms_to_models = forms_to_models_of(model_ids)
    read = await read_images(db, forms_to_models)
    owners = read.file_owners(model_ids)
    kept = await files_referenced_elsewhere(db, list(owners), list(forms_to_models)) if owners else set()
    lengths = collections.Counter()
    existing = set()
    for batch in in_batches([file_id for file_id in owners if file_id not in kept], ROUND_SIZE):
        files = db["fs.files"].find({"_id": {"$in": stored_file_ids(batch)}}, {"length": 1}, collation=EXACT)
        async for file in files:
            lengths[gridfs_file_key(file["_id"])] += int(file.get("length") or 0)
            existing.add(gridfs_file_key(file["_id"]))
    for model_id in model_ids:
        images = found[model_id]
        own = {file_id for file_id in existing if owners[file_id] == model_id}
        images.found_images = images.deleted_images = len(read.metadata_ids[model_id])
        images.deleted_files = len(own)
        images.kept_files = len(read.file_ids[model_id] & kept)
        images.file_bytes = sum(lengths[file_id] for file_id in own)


def failure_reported(error, calls):
    """Logs a database failure of ``calls`` and returns what their replies
    say of it: the outcome and a message safe for callers."""
    named = [call.request_id for call in calls[:LOGGED_REQUEST_IDS]]
    more = len(calls) - len(named)
    request_ids = ",".join(named) + (f",...({more} more)" if more else "")
    log.warning("delete of %d model(s) failed request_id=%s: %s: %s", sum(len(call.valid) for call in calls),
                request_ids, type(error).__name__, describe_failure(error))
    log.debug("request_id=%s the driver said: %s", request_ids, error)
    return classify_failure(error)


async def delete_and_describe_calls(db, calls, deadline, dry_run=False, on_full_round=None, on_answered=None):
    """Each call's replies. Invalid ids are answered without touching
    anything; the valid ones (distinct between calls) are deleted together
    (in a dry run, previewed) before ``deadline`` (on ``time.monotonic()``);
    a database failure is reported on each, with what was removed before it.
    ``on_answered(call, replies)`` is called as soon as a call's replies are
    final, which may be before the others'."""
    valid = [model_id for call in calls for model_id in call.valid]
    found = {model_id: ModelImages() for model_id in valid}
    answered = {}

    def answer(call, ending):
        answered[call] = call.replies(found, dry_run, *ending)
        if on_answered:
            on_answered(call, answered[call])

    endings = [(True, None)] * len(calls)
    try:
        timeout_s = deadline - time.monotonic()
        if valid and timeout_s <= 0:
            raise pymongo.errors.ExecutionTimeout("the call's deadline passed before the database was asked")
        with pymongo.timeout(timeout_s):
            if valid and dry_run:
                await preview_images_of_models(db, valid, found)
            elif valid:
                endings = await delete_images_of_calls(db, calls, found, deadline, on_full_round, answer)
    except Exception as error:  # Reported to the callers; the server goes on.
        endings = [(True, failure_reported(error, calls))] * len(calls)
    for call, ending in zip(calls, endings, strict=True):
        if call not in answered:
            answer(call, ending)
    return [answered[call] for call in calls]


async def delete_and_describe(db, model_ids, deadline, dry_run=False, request_id="-"):
    """One call's replies, one per id it names, in order; each model is
    deleted once however often it is named (see delete_and_describe_calls)."""
    (replies,) = await delete_and_describe_calls(db, [Call(model_ids, request_id)], deadline, dry_run)
    return replies


# ---------------------------------------------------------------------------
# The servicer
# ---------------------------------------------------------------------------


class ImageServiceServicer(pb2_grpc.ImageServiceServicer):
    """The ImageService methods of image_service.proto. The deletion runs on
    the event loop with pymongo's asyncio client: while it waits on MongoDB
    the loop serves other calls, health checks and reflection.

    Calls take turns (image_service_turns.py): under load, the calls that
    wait for a turn are deleted together, up to MAX_BATCH_SIZE models, each
    answered for its own; at most GRPC_MAX_WORKERS turns talk to MongoDB
    at once."""

    def __init__(self, db, mongo_timeout_s, max_deletions, metrics):
        self._db = db
        self._mongo_timeout_s = mongo_timeout_s
        self._metrics = metrics
        self._turns = Turns(self._take_turn, max_deletions, MAX_BATCH_SIZE)
        self.unfinished = self._turns.unfinished  # for the drain

    async def _delete(self, model_ids, dry_run, context):
        # The budget runs from now: time spent waiting for a turn counts
        # against it, as it does against the caller's deadline.
        remaining = context.time_remaining()
        budget = self._mongo_timeout_s
        if remaining is not None:
            # Stop short of the caller's deadline, so the reply saying what
            # was removed still reaches it.
            budget = min(budget, remaining - max(REPLY_MARGIN_S, remaining / 10))
        replies = asyncio.get_running_loop().create_future()
        call = Call(model_ids, CURRENT_CALL.get().request_id)
        self._turns.wait_for_turn(WaitingCall(call, time.monotonic() + budget, dry_run, replies))
        # A caller that hangs up does not stop the deletion: it ends within
        # its budget, whole rounds and all, and is counted.
        return await asyncio.shield(replies)

    async def _take_turn(self, group, deadline, stop_gathering):
        waiting_for = {waiting.call: waiting for waiting in group}

        def answered(call, replies):
            waiting = waiting_for[call]
            if not waiting.dry_run:
                self._metrics.count(replies)
            if not waiting.replies.done():
                waiting.replies.set_result(replies)

        await delete_and_describe_calls(self._db, list(waiting_for), deadline, group[0].dry_run,
                                        stop_gathering, answered)

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


def _server_credentials(config):
    if config.tls_cert is None:
        return None
    return grpc.ssl_server_credentials(
        [(config.tls_key, config.tls_cert)],
        root_certificates=config.tls_client_ca,
        require_client_auth=config.tls_client_ca is not None,
    )


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
    servicer = servicer or ImageServiceServicer(db, config.mongo_timeout_s, config.max_workers, metrics)
    pb2_grpc.add_ImageServiceServicer_to_server(servicer, server)
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
                                 min(config.health_interval_s, config.mongo_timeout_s), metrics.mongodb_up,
                                 index_check_timeout_s=config.mongo_timeout_s)
    await server.start()
    monitor.start()
    endpoint = None
    if config.metrics_port is not None:
        endpoint = start_metrics_endpoint(config.metrics_host, config.metrics_port, metrics.registry)
    deletions = getattr(servicer, "unfinished", set())
    return RunningServer(server, port, health_servicer, monitor, admission, deletions, endpoint)


class BackgroundServer:
    """The server on an event loop of its own, in a thread: for embedding
    it in synchronous code (the tests, the benchmark, the load run)."""

    def __init__(self, config, db, servicer=None, metrics=None, tracing=None):
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="grpc-loop", daemon=True)
        self._thread.start()
        self.running = self.run(start_server(config, db, servicer, metrics, tracing))
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
    parser.add_argument("--create-indexes", action="store_true",
                        help="create the indexes deletes need (images.model_id, images.image_id,"
                             " GridFS's on fs.chunks), then exit")
    sweep.add_arguments(parser)
    args = parser.parse_args(argv)
    sweep.check_arguments(parser, args)
    if args.create_indexes and args.sweep_orphans:
        parser.error("--create-indexes and --sweep-orphans are separate runs")
    return args


def main(argv=None):
    args = parse_arguments(argv)
    serving = not (args.sweep_orphans or args.create_indexes)
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
    if args.create_indexes:
        try:
            create_indexes(db)
        except pymongo.errors.PyMongoError as error:
            log.error("%s", tool_failure("cannot create the indexes", error, database_description))
            return 1
        print(f"indexes present on {database_description}: {describe_indexes()}")
        return 0
    if args.sweep_orphans:
        try:
            sweep.run_sweep(db, args)
        except pymongo.errors.PyMongoError as error:
            failure = tool_failure("sweep failed, nothing more was changed", error, database_description)
            log.error("%s", failure)
            log.debug("sweep: the driver said: %s", error)
            return 1
        return 0
    hint = functools.partial(in_memory_hint, config) if args.in_memory else None
    try:
        asyncio.run(serve(config, db, database_description, metrics, hint, tracing))
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
