"""The image service: deletes the images of 3D models from MongoDB GridFS.

The upload service stores each image as a GridFS file in the default bucket
(an ``fs.files`` document whose data sits in ``fs.chunks``) and records it in
the ``images`` collection as ``{name, image_id, model_id}``. Before the catalog
service deletes a model it calls ``DeleteImageByModelId``, and deletes the
model only when the reply says ``success: true``.

This one file is the whole service. It reads top to bottom:

1. configuration, from the environment and an optional ``.env`` file;
2. MongoDB access;
3. the deletion itself, in at most four database commands;
4. the servicer and what surrounds it (tokens, health, logging);
5. serving, the maintenance sweep and the command line.

Run ``python image_service_server.py --help`` for the command line.
"""

import argparse
import collections
import dataclasses
import datetime
import hmac
import json
import logging
import os
import signal
import sys
import threading
import time
import unicodedata
import urllib.parse
from concurrent import futures

import dotenv
import grpc
import pymongo
import pymongo.errors
from bson import ObjectId
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

import image_service_pb2 as pb2
import image_service_pb2_grpc as pb2_grpc

log = logging.getLogger("image_service")

SERVICE_NAME = pb2.DESCRIPTOR.services_by_name["ImageService"].full_name

# ---------------------------------------------------------------------------
# 1. Configuration
# ---------------------------------------------------------------------------


class ConfigError(ValueError):
    """A configuration value is missing or wrong; the message names it."""


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything the service reads from its environment, with the defaults."""

    mongo_uri: str
    mongo_db: str = "CatalogServiceDB"
    mongo_timeout_s: float = 5.0
    grpc_host: str = "0.0.0.0"
    grpc_port: int = 5014
    max_workers: int = 10
    max_concurrent_rpcs: int = 100
    reflection: bool = True
    tls_cert: bytes | None = None
    tls_key: bytes | None = None
    tls_client_ca: bytes | None = None
    auth_tokens: tuple[str, ...] = ()
    shutdown_grace_s: float = 10.0
    health_interval_s: float = 2.0
    log_level: str = "INFO"
    log_format: str = "text"
    # Strings that must never reach a log line: the password and the tokens.
    secrets: tuple[str, ...] = ()


def _text(env, name, default=None):
    """A variable's value; unset and empty both mean the default."""
    return env.get(name) or default


def _number(env, name, default, low, high, kind=int):
    raw = _text(env, name)
    if raw is None:
        return default
    try:
        value = kind(raw)
    except ValueError:
        value = None
    if value is None or not low <= value <= high:
        what = "a whole number" if kind is int else "a number"
        raise ConfigError(f"{name} must be {what} from {low} to {high}, got {raw!r}")
    return value


def _boolean(env, name, default):
    raw = _text(env, name)
    if raw is None:
        return default
    if raw.lower() in ("1", "true", "yes", "on"):
        return True
    if raw.lower() in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name} must be true or false, got {raw!r}")


def _choice(env, name, default, choices):
    value = _text(env, name, default)
    if value.lower() not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value.lower()


def _file_bytes(env, name):
    path = _text(env, name)
    if path is None:
        return None
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError as error:
        raise ConfigError(f"{name}: cannot read {path}: {error.strerror}") from None


def _host_in_uri(host):
    """An IPv6 literal needs brackets inside a URI."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def build_mongo_uri(env):
    """The MongoDB connection string: MONGO_URI as given, or built from parts.

    Credentials are percent-escaped so that any character may appear in them;
    with no MONGO_USER the URI carries no credentials at all.
    """
    if _text(env, "MONGO_URI"):
        return env["MONGO_URI"]
    host = _host_in_uri(_text(env, "MONGO_HOST", "localhost"))
    port = _number(env, "MONGO_PORT", 27017, 1, 65535)
    user, password = _text(env, "MONGO_USER"), _text(env, "MONGO_PASSWORD")
    if not user:
        if password:
            raise ConfigError("MONGO_PASSWORD is set but MONGO_USER is not")
        return f"mongodb://{host}:{port}/"
    credentials = urllib.parse.quote_plus(user)
    if password:
        credentials += ":" + urllib.parse.quote_plus(password)
    auth_source = urllib.parse.quote_plus(_text(env, "MONGO_AUTH_SOURCE", "admin"))
    return f"mongodb://{credentials}@{host}:{port}/?authSource={auth_source}"


def _uri_password(uri):
    """The password inside a connection string, raw and decoded, if any."""
    password = urllib.parse.urlsplit(uri).password
    return (password, urllib.parse.unquote_plus(password)) if password else ()


def describe_database(config):
    """Where the data lives, for logs: scheme, hosts and name, no credentials."""
    parts = urllib.parse.urlsplit(config.mongo_uri)
    hosts = parts.netloc.rpartition("@")[2]
    return f"{parts.scheme}://{hosts}/{config.mongo_db}"


def load_config(env):
    """Reads and checks every setting; raises ConfigError naming the culprit."""
    mongo_uri = build_mongo_uri(env)
    cert, key = _file_bytes(env, "GRPC_TLS_CERT"), _file_bytes(env, "GRPC_TLS_KEY")
    client_ca = _file_bytes(env, "GRPC_TLS_CLIENT_CA")
    if (cert is None) != (key is None):
        raise ConfigError("GRPC_TLS_CERT and GRPC_TLS_KEY must be set together")
    if client_ca is not None and cert is None:
        raise ConfigError("GRPC_TLS_CLIENT_CA needs GRPC_TLS_CERT and GRPC_TLS_KEY")
    tokens = tuple(t.strip() for t in _text(env, "GRPC_AUTH_TOKEN", "").split(",") if t.strip())
    password = _text(env, "MONGO_PASSWORD")
    secrets = (password, urllib.parse.quote_plus(password)) if password else ()
    return Config(
        mongo_uri=mongo_uri,
        mongo_db=_text(env, "MONGO_DB", Config.mongo_db),
        mongo_timeout_s=_number(env, "MONGO_TIMEOUT_MS", int(Config.mongo_timeout_s * 1000), 1, 600_000) / 1000,
        grpc_host=_text(env, "GRPC_HOST", Config.grpc_host),
        grpc_port=_number(env, "GRPC_PORT", Config.grpc_port, 0, 65535),
        max_workers=_number(env, "GRPC_MAX_WORKERS", Config.max_workers, 1, 1000),
        max_concurrent_rpcs=_number(env, "GRPC_MAX_CONCURRENT_RPCS", Config.max_concurrent_rpcs, 1, 100_000),
        reflection=_boolean(env, "GRPC_REFLECTION", Config.reflection),
        tls_cert=cert,
        tls_key=key,
        tls_client_ca=client_ca,
        auth_tokens=tokens,
        shutdown_grace_s=_number(env, "SHUTDOWN_GRACE_S", Config.shutdown_grace_s, 0.001, 3600, float),
        health_interval_s=_number(env, "HEALTH_CHECK_INTERVAL_S", Config.health_interval_s, 0.001, 3600, float),
        log_level=_choice(env, "LOG_LEVEL", Config.log_level, ("debug", "info", "warning", "error")).upper(),
        log_format=_choice(env, "LOG_FORMAT", Config.log_format, ("text", "json")),
        secrets=tuple(s for s in (*secrets, *_uri_password(mongo_uri), *tokens) if s),
    )


def read_environment(dotenv_path=".env"):
    """The process environment over the values of a ``.env`` file, if any."""
    return {**dotenv.dotenv_values(dotenv_path), **os.environ}


# ---------------------------------------------------------------------------
# 2. MongoDB access
# ---------------------------------------------------------------------------


def connect_to_mongo(config):
    """A client whose every wait is bounded by MONGO_TIMEOUT_MS, not the
    driver's 30 s default. It connects lazily, so start-up never blocks."""
    timeout_ms = int(config.mongo_timeout_s * 1000)
    return pymongo.MongoClient(
        config.mongo_uri,
        appname="image-service",
        serverSelectionTimeoutMS=timeout_ms,
        connectTimeoutMS=timeout_ms,
        connect=False,
    )


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
# 3. The deletion
# ---------------------------------------------------------------------------

MAX_MODEL_ID_LENGTH = 256
MAX_BATCH_SIZE = 1000
# The first read asks for every matching document at once, so that a batch
# costs one command, not one per 101 documents (the server's default batch).
READ_BATCH_SIZE = 100_000


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


def referenced_file_id(image_id):
    """The GridFS file id an ``images`` document points at, or None if its
    ``image_id`` is no valid id (the upload service writes the hex string,
    other writers the ObjectId itself)."""
    if isinstance(image_id, ObjectId):
        return image_id
    if isinstance(image_id, str) and ObjectId.is_valid(image_id):
        return ObjectId(image_id)
    return None


@dataclasses.dataclass
class ModelImages:
    """One model's images as read from ``images``, and what removing them did."""

    metadata_ids: list = dataclasses.field(default_factory=list)
    file_ids: set = dataclasses.field(default_factory=set)
    invalid_references: int = 0
    deleted_files: int = 0
    # References whose file was already gone: exact for one model; for a
    # batch that met some, only the batch's total is known (see the proto).
    files_already_gone: int = 0
    batch_files_already_gone: int = 0


def read_images(db, model_ids):
    """Command 1: every ``images`` document of these models, grouped by model.

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


def _attribute_removed_files(found, removed):
    """Shares the number of removed ``fs.files`` documents among the models."""
    owners = [images for images in found.values() if images.file_ids]
    missing = len(set().union(*(images.file_ids for images in owners))) - removed
    for images in owners:
        if len(owners) == 1:
            images.deleted_files = removed
            images.files_already_gone = missing
        else:
            images.deleted_files = len(images.file_ids)
            images.batch_files_already_gone = max(missing, 0)


def delete_images_of_models(db, model_ids):
    """Removes every image of the given models; returns what each had.

    At most four database commands, whatever the number of models or images:
    one read, then three deletes by ``$in``. The order makes every failure
    safe to retry: the files (``fs.files``, then ``fs.chunks``, as GridFS
    itself deletes) go first and the metadata last, so until the metadata is
    gone it still points at whatever a retry must finish. Only the metadata
    documents that were read are deleted (by ``_id``): an image uploaded
    while this runs is left whole, never as an orphaned file.
    """
    found = read_images(db, model_ids)
    file_ids = list(set().union(*(images.file_ids for images in found.values())))
    if file_ids:
        removed = db["fs.files"].delete_many({"_id": {"$in": file_ids}}).deleted_count
        db["fs.chunks"].delete_many({"files_id": {"$in": file_ids}})
        _attribute_removed_files(found, removed)
    metadata_ids = [i for images in found.values() for i in images.metadata_ids]
    if metadata_ids:
        db.images.delete_many({"_id": {"$in": metadata_ids}})
    return found


def _plural(count, noun):
    return f"{count} {noun}{'' if count == 1 else 's'}"


def describe_deletion(model_id, images):
    """The reply for one model whose delete went through."""
    count = len(images.metadata_ids)
    if count == 0:
        return pb2.DeleteImageResponse(
            success=True,
            outcome=pb2.OUTCOME_NOTHING_TO_DELETE,
            model_id=model_id,
            message=f"no images of model {model_id!r}; nothing to delete",
        )
    notes = [f"deleted {_plural(count, 'image')} and {_plural(images.deleted_files, 'file')}"]
    if images.files_already_gone:
        notes.append(f"{_plural(images.files_already_gone, 'reference')} to a file already gone")
    if images.batch_files_already_gone:
        notes.append(f"{_plural(images.batch_files_already_gone, 'reference')} in this batch to a file already gone")
    if images.invalid_references:
        notes.append(f"{_plural(images.invalid_references, 'reference')} had no valid file id")
    return pb2.DeleteImageResponse(
        success=True,
        outcome=pb2.OUTCOME_DELETED,
        model_id=model_id,
        deleted_images=count,
        deleted_files=images.deleted_files,
        message="; ".join(notes),
    )


def delete_and_describe(db, model_ids, timeout_s):
    """One reply per requested id, in order: invalid ids are answered without
    touching anything, the valid ones are deleted together within
    ``timeout_s``, and a database failure is reported on each of them."""
    reasons = {model_id: invalid_model_id_reason(model_id) for model_id in model_ids}
    valid = [model_id for model_id, reason in reasons.items() if reason is None]
    try:
        if valid and timeout_s <= 0:
            raise pymongo.errors.ExecutionTimeout("the call's deadline passed before the database was asked")
        with pymongo.timeout(timeout_s):
            found = delete_images_of_models(db, valid) if valid else {}
        failure = None
    except Exception as error:  # Reported to the caller; the server goes on.
        log.warning("delete of %d model(s) failed: %s: %s", len(valid), type(error).__name__, error)
        failure = classify_failure(error)
    replies = []
    for model_id in model_ids:
        if reasons[model_id]:
            replies.append(pb2.DeleteImageResponse(
                success=False, outcome=pb2.OUTCOME_INVALID_ARGUMENT,
                model_id=model_id, message=reasons[model_id]))
        elif failure:
            replies.append(pb2.DeleteImageResponse(
                success=False, outcome=failure[0], model_id=model_id, message=failure[1]))
        else:
            replies.append(describe_deletion(model_id, found[model_id]))
    return replies


# ---------------------------------------------------------------------------
# 4. The servicer, tokens, health and logging
# ---------------------------------------------------------------------------


def _shown(model_id, limit=80):
    """A model id as it may appear in a log line: quoted, escaped, bounded."""
    return repr(model_id[:limit]) + ("..." if len(model_id) > limit else "")


class ImageServiceServicer(pb2_grpc.ImageServiceServicer):
    """The ImageService methods of image_service.proto."""

    def __init__(self, db, mongo_timeout_s):
        self._db = db
        self._mongo_timeout_s = mongo_timeout_s

    def _database_budget(self, context):
        """MONGO_TIMEOUT_MS, or less when the caller's deadline is nearer."""
        remaining = context.time_remaining()
        return self._mongo_timeout_s if remaining is None else min(self._mongo_timeout_s, remaining)

    def DeleteImageByModelId(self, request, context):
        started = time.monotonic()
        (reply,) = delete_and_describe(self._db, [request.model_id], self._database_budget(context))
        log.info(
            "DeleteImageByModelId model_id=%s outcome=%s deleted_images=%d deleted_files=%d ms=%.1f",
            _shown(request.model_id), pb2.Outcome.Name(reply.outcome),
            reply.deleted_images, reply.deleted_files, (time.monotonic() - started) * 1000)
        return reply

    def DeleteImagesByModelIds(self, request, context):
        started = time.monotonic()
        if len(request.model_ids) > MAX_BATCH_SIZE:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"at most {MAX_BATCH_SIZE} model ids per call, got {len(request.model_ids)}")
        replies = delete_and_describe(self._db, list(request.model_ids), self._database_budget(context))
        outcomes = dict(collections.Counter(pb2.Outcome.Name(reply.outcome) for reply in replies))
        log.info(
            "DeleteImagesByModelIds models=%d outcomes=%s deleted_images=%d deleted_files=%d ms=%.1f",
            len(replies), outcomes, sum(r.deleted_images for r in replies),
            sum(r.deleted_files for r in replies), (time.monotonic() - started) * 1000)
        return pb2.DeleteImagesResponse(results=replies)


class BearerTokenInterceptor(grpc.ServerInterceptor):
    """Refuses, with UNAUTHENTICATED, every call that lacks
    ``authorization: Bearer <token>`` for one of the accepted tokens.

    Several tokens are accepted at once so they can be rotated. Health checks
    need none: probes carry no credentials.
    """

    _EXEMPT_PREFIX = "/grpc.health.v1.Health/"

    def __init__(self, tokens):
        self._tokens = [token.encode() for token in tokens]

    def _authorized(self, metadata):
        header = dict(metadata or ()).get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer":
            return False
        matched = False
        for token in self._tokens:  # Every token is compared: constant time.
            matched |= hmac.compare_digest(given.encode(), token)
        return matched

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if (handler is None or handler_call_details.method.startswith(self._EXEMPT_PREFIX)
                or self._authorized(handler_call_details.invocation_metadata)):
            return handler
        return _refusing_handler(handler, grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token")


def _refusing_handler(handler, code, details):
    """A handler of the same streaming kind as ``handler`` that only aborts,
    without so much as parsing the request."""
    def refuse(request_or_iterator, context):
        context.abort(code, details)

    kind = (handler.request_streaming, handler.response_streaming)
    make = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[kind]
    return make(refuse)


class MongoHealthMonitor:
    """Keeps the standard health service in step with MongoDB: SERVING while
    a ping answers within the timeout, NOT_SERVING while it does not."""

    def __init__(self, health_servicer, client, interval_s, timeout_s):
        self._health = health_servicer
        self._client = client
        self._interval_s = interval_s
        self._timeout_s = timeout_s
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mongo-health", daemon=True)
        self._last_status = None

    def start(self):
        self._thread.start()

    def stop(self):
        self._stopped.set()

    def check(self):
        """Pings MongoDB once and publishes the result."""
        try:
            with pymongo.timeout(self._timeout_s):
                self._client.admin.command("ping")
            status = health_pb2.HealthCheckResponse.SERVING
        except Exception as error:  # Any failure to answer means not serving.
            status = health_pb2.HealthCheckResponse.NOT_SERVING
            problem = type(error).__name__
        if self._stopped.is_set():
            return
        if status != self._last_status:  # Log the changes, not every ping.
            self._last_status = status
            if status == health_pb2.HealthCheckResponse.SERVING:
                log.info("health: SERVING, MongoDB answers")
            else:
                log.warning("health: NOT_SERVING, MongoDB does not answer a ping (%s)", problem)
        for service in ("", SERVICE_NAME):
            self._health.set(service, status)

    def _run(self):
        while not self._stopped.is_set():
            self.check()
            self._stopped.wait(self._interval_s)


class _JsonFormatter(logging.Formatter):
    """One JSON object per line, for log pipelines."""

    def format(self, record):
        entry = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def redact(text, secrets):
    """``text`` with every secret blanked out, the longest first."""
    for secret in sorted(secrets, key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


class _RedactingFormatter(logging.Formatter):
    """Wraps a formatter and blanks out secrets wherever they appear,
    tracebacks included, and in their JSON-escaped spelling too."""

    def __init__(self, inner, secrets):
        super().__init__()
        self._inner = inner
        self._spellings = {form for s in secrets for form in (s, json.dumps(s, ensure_ascii=False)[1:-1])}

    def format(self, record):
        return redact(self._inner.format(record), self._spellings)


def configure_logging(config, stream=None):
    """Text (default) or JSON lines on stderr, never showing a secret."""
    inner = (_JsonFormatter() if config.log_format == "json"
             else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(_RedactingFormatter(inner, config.secrets))
    logging.basicConfig(level=config.log_level, handlers=[handler], force=True)


# ---------------------------------------------------------------------------
# 5. Serving
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class RunningServer:
    """A started server: its gRPC server, bound port and health reporting."""

    server: grpc.Server
    port: int
    health: health.HealthServicer
    monitor: MongoHealthMonitor

    def stop(self, grace_s):
        """Reports NOT_SERVING first, then lets calls in flight finish."""
        self.monitor.stop()
        self.health.enter_graceful_shutdown()
        self.server.stop(grace_s).wait()


def _server_credentials(config):
    if config.tls_cert is None:
        return None
    return grpc.ssl_server_credentials(
        [(config.tls_key, config.tls_cert)],
        root_certificates=config.tls_client_ca,
        require_client_auth=config.tls_client_ca is not None,
    )


def start_server(config, db, servicer=None):
    """Builds the server for ``db`` and starts it on the configured address
    (port 0 picks a free one). Returns it running; the caller stops it.
    ``servicer`` replaces the ImageService (the benchmark's no-op floor)."""
    interceptors = [BearerTokenInterceptor(config.auth_tokens)] if config.auth_tokens else []
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=config.max_workers, thread_name_prefix="rpc"),
        interceptors=interceptors,
        # Past this many calls at once, gRPC answers RESOURCE_EXHAUSTED at
        # once instead of queueing without bound.
        maximum_concurrent_rpcs=config.max_concurrent_rpcs,
        # A second instance on the same port must fail, not share it.
        options=[("grpc.so_reuseport", 0)],
    )
    pb2_grpc.add_ImageServiceServicer_to_server(servicer or ImageServiceServicer(db, config.mongo_timeout_s), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if config.reflection:
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    address = f"{_host_in_uri(config.grpc_host)}:{config.grpc_port}"
    credentials = _server_credentials(config)
    port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    # NOT_SERVING until the first ping answers. Each ping waits at most an
    # interval, so a dead MongoDB shows as NOT_SERVING within two intervals.
    for service in ("", SERVICE_NAME):
        health_servicer.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
    monitor = MongoHealthMonitor(health_servicer, db.client, config.health_interval_s,
                                 min(config.health_interval_s, config.mongo_timeout_s))
    monitor.start()
    server.start()
    return RunningServer(server, port, health_servicer, monitor)


def serve(config, db, describe):
    """Serves until SIGTERM or SIGINT, then shuts down gracefully."""
    stop_requested = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop_requested.set())
    try:
        running = start_server(config, db)
    except RuntimeError as error:  # gRPC's way of saying the port is taken
        raise ConfigError(f"GRPC_PORT: cannot listen on {config.grpc_host}:{config.grpc_port}") from error
    tls = "mTLS" if config.tls_client_ca else "TLS" if config.tls_cert else "plaintext"
    log.info("serving %s on %s:%d (%s%s), database %s", SERVICE_NAME, config.grpc_host, running.port,
             tls, ", bearer tokens" if config.auth_tokens else "", describe)
    stop_requested.wait()
    log.info("shutting down: finishing calls in flight for up to %.0f s", config.shutdown_grace_s)
    running.stop(config.shutdown_grace_s)
    log.info("stopped")


# ---------------------------------------------------------------------------
# In-memory stand-in and sample data (--in-memory)
# ---------------------------------------------------------------------------

GRIDFS_CHUNK_SIZE = 255 * 1024  # GridFS's default chunk size


def store_image(db, model_id, data, name=None):
    """Stores an image exactly as the upload service does: a GridFS file in
    bucket ``fs`` named ``<model_id>.jpg``, then its ``images`` document."""
    file_id = ObjectId()
    for n, start in enumerate(range(0, len(data), GRIDFS_CHUNK_SIZE)):
        db["fs.chunks"].insert_one({"files_id": file_id, "n": n, "data": data[start:start + GRIDFS_CHUNK_SIZE]})
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


def open_in_memory_database(config):
    """A mongomock database holding a few sample images."""
    import mongomock  # Only this mode needs it.

    db = mongomock.MongoClient()[config.mongo_db]
    for model_id, count in SAMPLE_MODELS.items():
        for number in range(count):
            store_image(db, model_id, bytes(300 * 1024), name=f"{model_id}-{number}.jpg")
    return db


# ---------------------------------------------------------------------------
# Maintenance: orphans left by the old service (--sweep-orphans)
# ---------------------------------------------------------------------------


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
    referenced = set(references.values())
    unreferenced = [file_id for file_id, uploaded in files.items() if file_id not in referenced
                    and uploaded is not None and _utc(uploaded) < cutoff]
    dangling = [doc_id for doc_id, file_id in references.items() if file_id not in files]
    chunk_groups = db["fs.chunks"].aggregate([{"$group": {"_id": "$files_id", "newest": {"$max": "$_id"}}}])
    orphan_chunks = [group["_id"] for group in chunk_groups if group["_id"] not in files
                     and isinstance(group["newest"], ObjectId) and group["newest"].generation_time < cutoff]
    return OrphanReport(orphan_chunks, unreferenced, dangling)


def _utc(moment):
    return moment if moment.tzinfo else moment.replace(tzinfo=datetime.timezone.utc)


def _in_batches(items, size):
    for start in range(0, len(items), size):
        yield items[start:start + size]


def sweep_orphans(db, report, apply_files, batch_size):
    """Removes what the report found, ``batch_size`` ids per command: chunks
    without a file and metadata pointing at nothing, and unreferenced files
    only when ``apply_files``. Returns the number of documents removed."""
    removed = {"chunks": 0, "images": 0, "files": 0}
    for batch in _in_batches(report.chunk_file_ids, batch_size):
        removed["chunks"] += db["fs.chunks"].delete_many({"files_id": {"$in": batch}}).deleted_count
    for batch in _in_batches(report.dangling_metadata_ids, batch_size):
        removed["images"] += db.images.delete_many({"_id": {"$in": batch}}).deleted_count
    if apply_files:
        for batch in _in_batches(report.unreferenced_file_ids, batch_size):
            # A file is gone for good: look once more for a reference made
            # since the scan, in either spelling of the id.
            spellings = batch + [str(file_id) for file_id in batch]
            taken = {referenced_file_id(d["image_id"]) for d in db.images.find({"image_id": {"$in": spellings}})}
            batch = [file_id for file_id in batch if file_id not in taken]
            removed["files"] += db["fs.files"].delete_many({"_id": {"$in": batch}}).deleted_count
            removed["chunks"] += db["fs.chunks"].delete_many({"files_id": {"$in": batch}}).deleted_count
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


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def parse_arguments(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--in-memory", action="store_true",
                        help="serve an in-memory MongoDB stand-in holding sample images (no MongoDB needed)")
    parser.add_argument("--sweep-orphans", action="store_true",
                        help="report orphaned chunks, files and metadata, then exit")
    parser.add_argument("--apply", action="store_true",
                        help="with --sweep-orphans: remove orphan chunks and dangling metadata")
    parser.add_argument("--apply-files", action="store_true",
                        help="with --apply: remove unreferenced files too")
    parser.add_argument("--batch-size", type=int, default=500, help="ids per delete command when sweeping")
    parser.add_argument("--min-age-s", type=float, default=3600,
                        help="when sweeping, leave files and chunks younger than this (uploads in progress)")
    args = parser.parse_args(argv)
    if args.apply_files and not args.apply:
        parser.error("--apply-files needs --apply")
    if args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    return args


def main(argv=None):
    args = parse_arguments(argv)
    try:
        config = load_config(read_environment())
    except ConfigError as error:
        print(f"configuration error: {error}", file=sys.stderr)
        return 2
    configure_logging(config)
    if args.in_memory:
        db, describe = open_in_memory_database(config), f"in-memory stand-in/{config.mongo_db}"
        log.info("in-memory MongoDB stand-in with sample models %s; try: python image_service_client.py %s"
                 " --address 127.0.0.1:%d", ", ".join(SAMPLE_MODELS), next(iter(SAMPLE_MODELS)), config.grpc_port)
    else:
        try:
            client = connect_to_mongo(config)
        except (pymongo.errors.ConfigurationError, ValueError) as error:  # The driver's words for a bad URI.
            reason = redact(str(error).splitlines()[0], config.secrets)
            print(f"configuration error: MONGO_URI: {reason}", file=sys.stderr)
            return 2
        db, describe = client[config.mongo_db], describe_database(config)
    if args.sweep_orphans:
        try:
            run_sweep(db, args)
        except pymongo.errors.PyMongoError as error:
            log.error("sweep failed, nothing more was changed: %s: %s", type(error).__name__, error)
            return 1
        return 0
    try:
        serve(config, db, describe)
    except ConfigError as error:
        print(f"configuration error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
