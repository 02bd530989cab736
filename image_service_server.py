"""The image service: deletes the images of 3D models from MongoDB GridFS.

The upload service stores each image as a GridFS file in the default bucket
(an ``fs.files`` document whose data sits in ``fs.chunks``) and records it in
the ``images`` collection as ``{name, image_id, model_id}``. Before the catalog
service deletes a model it calls ``DeleteImageByModelId``, and deletes the
model only when the reply says ``success: true``.

This one file is the whole service. It reads top to bottom:

1. configuration, from the environment and an optional ``.env`` file, all
   checked before anything listens;
2. MongoDB access (command timing, the index check);
3. the deletion itself: four database commands up to 100,000 images;
4. the calls: the servicer and the interceptors around it (request ids and
   log lines, tokens, admission), health, metrics and logging;
5. serving on grpc.aio and the drain, then the in-memory stand-in, the
   maintenance sweep and the command line.

Run ``python3 image_service_server.py --help`` for the command line.
"""

import argparse
import asyncio
import collections
import contextlib
import contextvars
import dataclasses
import datetime
import errno
import functools
import hmac
import inspect
import ipaddress
import json
import logging
import os
import re
import signal
import socket
import ssl
import sys
import threading
import time
import unicodedata
import urllib.parse
import uuid
from concurrent import futures

# gRPC's own log lines (one per failed TLS handshake, say) go to stderr
# outside our log format, and any client can cause them: errors only, unless
# the operator asks for more. gRPC reads this once, when it is imported.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import dotenv
import grpc
import prometheus_client
import pymongo
import pymongo.errors
import pymongo.monitoring
import pymongo.uri_parser
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
    shutdown_delay_s: float = 0.0
    shutdown_grace_s: float = 10.0
    health_interval_s: float = 2.0
    metrics_host: str = "0.0.0.0"
    metrics_port: int | None = None  # None: no metrics endpoint
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


def _check_tls_files(env):
    """Loads the TLS files as gRPC will, so that a garbage file or a key
    that does not belong to the certificate stops start-up here, by name."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    for name in ("GRPC_TLS_CERT", "GRPC_TLS_CLIENT_CA"):
        if _text(env, name):
            try:
                ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=env[name])
            except (ssl.SSLError, ValueError):
                raise ConfigError(f"{name}: no PEM certificate in {env[name]}") from None
    try:
        context.load_cert_chain(env["GRPC_TLS_CERT"], env["GRPC_TLS_KEY"], password=b"")
    except (ssl.SSLError, ValueError) as error:
        problem = ("does not belong to the certificate in GRPC_TLS_CERT" if "KEY_VALUES_MISMATCH" in str(error)
                   else "is not an unencrypted PEM private key")
        raise ConfigError(f"GRPC_TLS_KEY: {env['GRPC_TLS_KEY']} {problem}") from None


MIN_SECRET_LENGTH = 16


def redact(text, secrets):
    """``text`` with every whole secret blanked out, the longest first. Only
    whole ones: blanking a secret's letters inside other words would show
    where it occurs, and so tell it."""
    for secret in sorted(secrets, key=len, reverse=True):
        text = re.sub(rf"(?<![A-Za-z0-9]){re.escape(secret)}(?![A-Za-z0-9])", "***", text)
    return text


def _auth_tokens(env):
    """The accepted bearer tokens. Set but empty of tokens, or a token too
    short to be a secret (or to be redacted reliably), stops start-up:
    authentication must never be off by accident."""
    raw = env.get("GRPC_AUTH_TOKEN")
    if not raw:
        return ()
    tokens = tuple(token.strip() for token in raw.split(",") if token.strip())
    if not tokens:
        raise ConfigError("GRPC_AUTH_TOKEN is set but holds no token; unset it to serve without tokens")
    for number, token in enumerate(tokens, 1):
        if len(token) < MIN_SECRET_LENGTH:
            raise ConfigError(f"GRPC_AUTH_TOKEN: token {number} of {len(tokens)} is shorter than"
                              f" {MIN_SECRET_LENGTH} characters")
    return tokens


def _mongo_host(env):
    host = _text(env, "MONGO_HOST", "localhost")
    with contextlib.suppress(ValueError):
        return str(ipaddress.ip_address(host))
    if not re.fullmatch(r"[A-Za-z0-9_]([A-Za-z0-9_.-]{0,251}[A-Za-z0-9_])?", host):
        raise ConfigError(f"MONGO_HOST must be a host name or an IP address, without a port (that is"
                          f" MONGO_PORT), got {host[:80]!r}")
    return host


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
    host = _host_in_uri(_mongo_host(env))
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


def _uri_passwords(uri):
    """The password inside a connection string, as written and decoded,
    found without parsing the rest (which may be what is wrong)."""
    authority = uri.partition("://")[2].partition("/")[0].partition("?")[0]
    userinfo = authority.rpartition("@")[0]
    password = userinfo.partition(":")[2]
    return tuple({password, urllib.parse.unquote_plus(password)} - {""})


def parse_mongo_uri(uri):
    """The parts of a connection string, checked as the driver will check
    them, but without the DNS lookup of ``mongodb+srv://`` (start-up must
    not depend on DNS; the driver resolves when it first connects)."""
    scheme = uri.partition("://")[0]
    if scheme not in ("mongodb", "mongodb+srv"):
        raise ConfigError("MONGO_URI must start with mongodb:// or mongodb+srv://")
    try:
        parsed = pymongo.uri_parser.parse_uri("mongodb://" + uri.partition("://")[2])
    except Exception as error:  # The driver's many ways of saying "malformed".
        reason = redact(str(error).splitlines()[0] if str(error) else type(error).__name__, _uri_passwords(uri))
        raise ConfigError(f"MONGO_URI: {reason}") from None
    password = parsed.get("password")
    if password and len(password) < MIN_SECRET_LENGTH:
        raise ConfigError(f"MONGO_URI: the password is shorter than {MIN_SECRET_LENGTH} characters")
    if parsed["options"].get("w") == 0:
        raise ConfigError("MONGO_URI: w=0 (unacknowledged writes) would leave every delete unverifiable;"
                          " use w=1 or w=majority")
    return {**parsed, "scheme": scheme}


def describe_database(config):
    """Where the data lives, for logs: scheme, hosts and name, no credentials."""
    parsed = parse_mongo_uri(config.mongo_uri)
    hosts = ",".join(f"{_host_in_uri(host)}{'' if port is None else f':{port}'}" for host, port in parsed["nodelist"])
    return f"{parsed['scheme']}://{hosts}/{config.mongo_db}"


def _database_name(env):
    """MongoDB's rules for a database name (the stricter, portable ones)."""
    name = _text(env, "MONGO_DB", Config.mongo_db)
    if len(name.encode()) >= 64 or re.search(r'[/\\. "$*<>:|?\x00]', name):
        raise ConfigError(f"MONGO_DB must be under 64 bytes with none of / \\ . \" $ * < > : | ? or a space,"
                          f" got {name[:80]!r}")
    return name


def load_config(env):
    """Reads and checks every setting; raises ConfigError naming the culprit."""
    password = _text(env, "MONGO_PASSWORD")
    if password and len(password) < MIN_SECRET_LENGTH:
        raise ConfigError(f"MONGO_PASSWORD is shorter than {MIN_SECRET_LENGTH} characters")
    mongo_uri = build_mongo_uri(env)
    parse_mongo_uri(mongo_uri)
    cert, key = _file_bytes(env, "GRPC_TLS_CERT"), _file_bytes(env, "GRPC_TLS_KEY")
    client_ca = _file_bytes(env, "GRPC_TLS_CLIENT_CA")
    if (cert is None) != (key is None):
        raise ConfigError("GRPC_TLS_CERT and GRPC_TLS_KEY must be set together")
    if client_ca is not None and cert is None:
        raise ConfigError("GRPC_TLS_CLIENT_CA needs GRPC_TLS_CERT and GRPC_TLS_KEY")
    if cert is not None:
        _check_tls_files(env)
    tokens = _auth_tokens(env)
    secrets = (password, urllib.parse.quote_plus(password)) if password else ()
    return Config(
        mongo_uri=mongo_uri,
        mongo_db=_database_name(env),
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
        shutdown_delay_s=_number(env, "SHUTDOWN_DELAY_S", Config.shutdown_delay_s, 0, 3600, float),
        shutdown_grace_s=_number(env, "SHUTDOWN_GRACE_S", Config.shutdown_grace_s, 0.001, 3600, float),
        health_interval_s=_number(env, "HEALTH_CHECK_INTERVAL_S", Config.health_interval_s, 0.001, 3600, float),
        metrics_host=_text(env, "METRICS_HOST", _text(env, "GRPC_HOST", Config.grpc_host)),
        metrics_port=_number(env, "METRICS_PORT", None, 0, 65535),
        log_level=_choice(env, "LOG_LEVEL", Config.log_level, ("debug", "info", "warning", "error")).upper(),
        log_format=_choice(env, "LOG_FORMAT", Config.log_format, ("text", "json")),
        secrets=tuple(s for s in (*secrets, *_uri_passwords(mongo_uri), *tokens) if s),
    )


def read_environment(dotenv_path=".env"):
    """The process environment over the values of a ``.env`` file, if any.
    A variable exported empty while ``.env`` gives it a value is refused: it
    would silently turn that value back into the default."""
    from_file = dotenv.dotenv_values(dotenv_path)
    for name, value in os.environ.items():
        if value == "" and from_file.get(name):
            raise ConfigError(f"{name} is exported empty, which would hide its value in .env;"
                              " unset it or give it a value")
    return {**from_file, **os.environ}


def check_listen_address(host, port, prefix="GRPC"):
    """Binds and lets go of the address, so that an unusable host or a port
    in use stops start-up naming PREFIX_HOST or PREFIX_PORT, before anything
    listens and before gRPC can print its own error lines."""
    try:
        family, kind, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)[0]
    except (socket.gaierror, UnicodeError):
        raise ConfigError(f"{prefix}_HOST: cannot resolve {host[:80]!r}") from None
    with socket.socket(family, kind) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC binds
        try:
            probe.bind(address)
        except OSError as error:
            variable = f"{prefix}_PORT" if error.errno == errno.EADDRINUSE else f"{prefix}_HOST"
            raise ConfigError(f"{variable}: cannot listen on {host}:{port}: {error.strerror.lower()}") from None


# ---------------------------------------------------------------------------
# 2. MongoDB access
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


class CommandTimer(pymongo.monitoring.CommandListener):
    """Feeds the driver's own command monitoring into a histogram by command name."""

    def __init__(self, histogram):
        self._histogram = histogram

    def started(self, event):
        pass

    def succeeded(self, event):
        self._histogram.labels(event.command_name).observe(event.duration_micros / 1e6)

    failed = succeeded


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
    for collection in missing_indexes(db):
        keys, options, cost = INDEXES[collection]
        spec = "{" + ", ".join(f"{key}: {order}" for key, order in keys) + "}"
        log.warning("index missing on %s %s: %s; create it with: python3 image_service_server.py --create-indexes"
                    " (or db.getCollection(%r).createIndex(%s%s))", collection, spec, cost, collection, spec,
                    ", {unique: true}" if options.get("unique") else "")


def create_indexes(db):
    """Creates both indexes; MongoDB leaves an existing one as it is."""
    for collection, (keys, options, _) in INDEXES.items():
        db[collection].create_index(keys, **options)


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


def echoed(model_id):
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
    # What the database reported removed (see share_out for batches).
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


def in_batches(items, size):
    for start in range(0, len(items), size):
        yield items[start:start + size]


def delete_by_ids(collection, field, ids):
    """Deletes the documents whose ``field`` is one of ``ids``, ID_BATCH_SIZE
    ids per command; returns how many the database removed."""
    return sum(collection.delete_many({field: {"$in": batch}}).deleted_count
               for batch in in_batches(ids, ID_BATCH_SIZE))


def share_out(wanted, removed):
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
    files = share_out([len(images.file_ids) for images in models], removed_files)
    metadata = share_out([len(images.metadata_ids) for images in models], removed_images)
    for images, deleted_files, deleted_images in zip(models, files, metadata):
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


def describe_preview(model_id, images):
    """The reply for one model in a dry run."""
    return pb2.DeleteImageResponse(
        success=True,
        outcome=pb2.OUTCOME_DELETED if images.deleted_images else pb2.OUTCOME_NOTHING_TO_DELETE,
        model_id=model_id,
        deleted_images=images.deleted_images,
        deleted_files=images.deleted_files,
        file_bytes=images.file_bytes,
        message=(f"would delete {_plural(images.deleted_images, 'image')} and"
                 f" {_plural(images.deleted_files, 'file')} ({images.file_bytes} bytes); nothing was changed"),
    )


def _plural(count, noun):
    return f"{count} {noun}{'' if count == 1 else 's'}"


def describe_deletion(model_id, images):
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
            notes.append(f"{len(images.metadata_ids) - images.deleted_images} removed by a concurrent delete first")
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
            found = (preview_images_of_models if dry_run else delete_images_of_models)(db, valid) if valid else {}
        failure = None
    except Exception as error:  # Reported to the caller; the server goes on.
        log.warning("delete of %d model(s) failed: %s: %s", len(valid), type(error).__name__, error)
        failure = classify_failure(error)
    replies = []
    for model_id in model_ids:
        if reasons[model_id]:
            replies.append(pb2.DeleteImageResponse(
                success=False, outcome=pb2.OUTCOME_INVALID_ARGUMENT,
                model_id=echoed(model_id), message=reasons[model_id]))
        elif failure:
            replies.append(pb2.DeleteImageResponse(
                success=False, outcome=failure[0], model_id=model_id, message=failure[1]))
        else:
            replies.append((describe_preview if dry_run else describe_deletion)(model_id, found[model_id]))
    return replies


# ---------------------------------------------------------------------------
# 4. The calls: the servicer and the interceptors around it
# ---------------------------------------------------------------------------
#
# The protocol runs on one asyncio event loop; only database work runs on
# threads (GRPC_MAX_WORKERS of them). A call passes through, outermost first:
# CallInterceptor (request id, parsing, one log line), BearerTokenInterceptor
# (tokens), Admission (the bound on deletes in flight), then the servicer.

MAX_REQUEST_ID_LENGTH = 64
SHOWN_IDS = 5  # model ids named in a batch's log line


def _shown(model_id, limit=80):
    """A model id as it may appear in a log line: quoted, escaped, bounded."""
    return repr(model_id[:limit]) + ("..." if len(model_id) > limit else "")


def _shown_ids(model_ids):
    shown = ",".join(_shown(model_id) for model_id in model_ids[:SHOWN_IDS])
    return shown + (f",...(+{len(model_ids) - SHOWN_IDS})" if len(model_ids) > SHOWN_IDS else "")


def request_id_of(metadata):
    """The caller's ``x-request-id``, bounded and reduced to safe characters,
    or a new one."""
    given = dict(metadata or ()).get("x-request-id", "")
    if isinstance(given, bytes):
        given = given.decode("ascii", "replace")
    safe = "".join(ch for ch in given if ch.isascii() and (ch.isalnum() or ch in "-_.:/"))
    return safe[:MAX_REQUEST_ID_LENGTH] or uuid.uuid4().hex


@dataclasses.dataclass
class Call:
    """One call as its log line tells it; the servicer fills in ``summary``."""

    method: str
    request_id: str
    peer: str
    model_ids: list = dataclasses.field(default_factory=list)
    summary: str = ""


CURRENT_CALL = contextvars.ContextVar("current_call")


class Metrics:
    """The Prometheus series, in a registry of the server's own. No label
    holds a model id, a peer or a secret: only methods, statuses, outcomes
    and command names, all from small fixed sets."""

    # gRFC A66's latency buckets (seconds), from 100 us to 100 s.
    BUCKETS = (0.0001, 0.0003, 0.0006, 0.001, 0.002, 0.004, 0.006, 0.01, 0.016, 0.025, 0.04, 0.065, 0.1,
               0.16, 0.25, 0.4, 0.65, 1, 2, 5, 10, 20, 50, 100)

    def __init__(self):
        self.registry = prometheus_client.CollectorRegistry()
        series = {"registry": self.registry}
        self.call_duration = prometheus_client.Histogram(
            "grpc_server_call_duration_seconds", "Time from a call's arrival to its status, by method and status.",
            ["grpc_method", "grpc_status"], buckets=self.BUCKETS, **series)
        self.deletions = prometheus_client.Counter(
            "image_service_deletions", "Model ids answered by real (not dry-run) deletes, by outcome.",
            ["outcome"], **series)
        self.images_deleted = prometheus_client.Counter(
            "image_service_images_deleted", "images metadata documents removed, as MongoDB reported.", **series)
        self.files_deleted = prometheus_client.Counter(
            "image_service_files_deleted", "GridFS files removed with their chunks, as MongoDB reported.", **series)
        self.mongodb_command_duration = prometheus_client.Histogram(
            "image_service_mongodb_command_duration_seconds", "MongoDB commands, timed by the driver, by command.",
            ["command"], buckets=self.BUCKETS, **series)
        self.mongodb_up = prometheus_client.Gauge(
            "image_service_mongodb_up", "1 while MongoDB answers the health ping, 0 while it does not.", **series)
        self.calls_in_flight = prometheus_client.Gauge(
            "image_service_calls_in_flight", "ImageService calls admitted and not yet ended.", **series)

    def count(self, replies):
        """Counts a call's results, a few updates per call even for a batch
        of 1000 (this runs on the event loop)."""
        for outcome, number in collections.Counter(reply.outcome for reply in replies).items():
            self.deletions.labels(pb2.Outcome.Name(outcome)).inc(number)
        self.images_deleted.inc(sum(reply.deleted_images for reply in replies))
        self.files_deleted.inc(sum(reply.deleted_files for reply in replies))


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
        replies = await loop.run_in_executor(self._threads, delete_and_describe, self._db, model_ids, deadline, dry_run)
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


def _rewrapped(handler, behavior, request_deserializer):
    """A handler of the same streaming kind as ``handler``, with another
    behavior and request deserializer."""
    kind = ("unary_unary", "unary_stream", "stream_unary", "stream_stream")[
        2 * handler.request_streaming + handler.response_streaming]
    make = getattr(grpc, f"{kind}_rpc_method_handler")
    return make(behavior, request_deserializer=request_deserializer,
                response_serializer=handler.response_serializer)


def _behavior_of(handler):
    return (handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream)


async def _run_behavior(behavior, request, context):
    """Runs a handler's behavior, whether a coroutine or an async generator."""
    result = behavior(request, context)
    if inspect.isasyncgen(result):
        async for response in result:
            await context.write(response)
        return None
    return await result


class _Unparsable:
    """Stands in for a request body that does not parse."""


class CallInterceptor(grpc.aio.ServerInterceptor):
    """Around every call: a request id (the caller's ``x-request-id`` or a new
    one, returned in the trailing metadata), a request body that does not
    parse answered with INVALID_ARGUMENT and no traceback, and one log line
    with method, status, request id and peer. Health and reflection calls
    log at DEBUG: probes would flood the log."""

    _QUIET_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")

    def __init__(self, metrics):
        self._metrics = metrics
        self._wrapped = _WrappedHandlers(self._wrap)

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        return handler and self._wrapped.get(handler_call_details.method, handler)

    def _wrap(self, full_method, handler):
        method = full_method.rsplit("/", 1)[-1]
        level = logging.DEBUG if full_method.startswith(self._QUIET_PREFIXES) else logging.INFO
        duration = functools.partial(self._metrics.call_duration.labels, full_method.lstrip("/"))

        def parse(body, deserialize=handler.request_deserializer):
            try:
                return deserialize(body) if deserialize else body
            except Exception:  # Bad bytes are the caller's problem, not ours.
                return _Unparsable()

        async def behavior(request, context):
            call = Call(method, request_id_of(context.invocation_metadata()), context.peer(), _model_ids_of(request))
            CURRENT_CALL.set(call)
            context.set_trailing_metadata((("x-request-id", call.request_id),))
            started, status = time.monotonic(), "OK"
            try:
                if isinstance(request, _Unparsable):
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                        "the request body is not a valid message (bad bytes or invalid UTF-8)")
                return await _run_behavior(_behavior_of(handler), request, context)
            except asyncio.CancelledError:
                status = "CANCELLED"
                raise
            except grpc.aio.AbortError:
                status = context.code().name if context.code() else "UNKNOWN"
                raise
            except Exception:
                status = "UNKNOWN"
                log.exception("%s request_id=%s failed unexpectedly", method, call.request_id)
                raise
            finally:
                seconds = time.monotonic() - started
                duration(status).observe(seconds)
                _log_call(call, status, level, seconds * 1000)

        return _rewrapped(handler, behavior, handler.request_deserializer if handler.request_streaming else parse)


class _WrappedHandlers:
    """An interceptor's wrapped handler for each method, built once: the
    handlers gRPC finds for a method stay the same from call to call."""

    def __init__(self, wrap):
        self._wrap = wrap
        self._by_method = {}

    def get(self, method, handler):
        inner, wrapped = self._by_method.get(method, (None, None))
        if inner is not handler:
            wrapped = self._wrap(method, handler)
            self._by_method[method] = (handler, wrapped)
        return wrapped


def _model_ids_of(request):
    if isinstance(request, pb2.DeleteImageRequest):
        return [request.model_id]
    if isinstance(request, pb2.DeleteImagesRequest):
        return list(request.model_ids)
    return []


def _log_call(call, status, level, ms):
    ids = (f" model_id={_shown(call.model_ids[0])}" if call.method == "DeleteImageByModelId" and call.model_ids
           else f" models={len(call.model_ids)} ids={_shown_ids(call.model_ids)}" if call.model_ids else "")
    if status != "OK" and not (status == "CANCELLED" and level == logging.DEBUG):
        level = logging.WARNING  # a refused or failed call; a probe that hung up is no news
    log.log(level, "%s status=%s request_id=%s peer=%s%s%s ms=%.1f", call.method, status, call.request_id,
            call.peer, ids, f" {call.summary}" if call.summary else "", ms)


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses, with UNAUTHENTICATED, every call that lacks
    ``authorization: Bearer <token>`` for one of the accepted tokens,
    without so much as parsing its request.

    Several tokens are accepted at once so they can be rotated. Health checks
    need none: probes carry no credentials.
    """

    _EXEMPT_PREFIX = "/grpc.health.v1.Health/"

    def __init__(self, tokens):
        self._tokens = [token.encode() for token in tokens]
        self._refusals = _WrappedHandlers(self._refusal)

    def _authorized(self, metadata):
        header = dict(metadata or ()).get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer":
            return False
        matched = False
        for token in self._tokens:  # Every token is compared: constant time.
            matched |= hmac.compare_digest(given.encode(), token)
        return matched

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if (handler is None or handler_call_details.method.startswith(self._EXEMPT_PREFIX)
                or self._authorized(handler_call_details.invocation_metadata)):
            return handler
        return self._refusals.get(handler_call_details.method, handler)

    @staticmethod
    def _refusal(method, handler):
        async def refuse(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token")

        return _rewrapped(handler, refuse, None)


class Admission(grpc.aio.ServerInterceptor):
    """Bounds the ImageService calls in flight (GRPC_MAX_CONCURRENT_RPCS);
    past it, RESOURCE_EXHAUSTED at once. Health and reflection are never
    counted. A call leaves as soon as it ends, is cancelled or passes its
    deadline, even while its database thread finishes in the background.
    Knows what is in flight, so a shutdown can say what it abandoned."""

    def __init__(self, bound, gauge):
        self._bound = bound
        self._gauge = gauge
        self._in_flight = {}  # task -> Call
        self._idle = asyncio.Event()
        self._idle.set()
        self._wrapped = _WrappedHandlers(self._wrap)
        self.stopping = False

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or not handler_call_details.method.startswith(f"/{SERVICE_NAME}/"):
            return handler
        return self._wrapped.get(handler_call_details.method, handler)

    def _wrap(self, method, handler):
        async def admitted(request, context):
            if len(self._in_flight) >= self._bound:
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                    f"server busy: {self._bound} deletes in flight; retry with backoff")
            task = asyncio.current_task()
            self._in_flight[task] = CURRENT_CALL.get()
            self._gauge.inc()
            self._idle.clear()
            try:
                return await _run_behavior(_behavior_of(handler), request, context)
            except asyncio.CancelledError:
                if self.stopping:
                    self._log_abandoned(self._in_flight[task])
                raise
            finally:
                self._gauge.dec()
                self._in_flight.pop(task, None)
                if not self._in_flight:
                    self._idle.set()

        return _rewrapped(handler, admitted, handler.request_deserializer)

    async def wait_idle(self, timeout_s):
        """Until no ImageService call is in flight, or ``timeout_s`` passes."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout_s)

    def abandon_all(self):
        """Logs every call still in flight as abandoned (exiting now)."""
        for call in self._in_flight.values():
            self._log_abandoned(call)
        self._in_flight.clear()

    @staticmethod
    def _log_abandoned(call):
        log.warning("abandoned at shutdown: %s request_id=%s %s; safe to retry (files go before metadata)",
                    call.method, call.request_id, _shown_ids(call.model_ids))


class MongoHealthMonitor:
    """Keeps the standard health service in step with MongoDB: SERVING while
    a ping answers within the timeout, NOT_SERVING while it does not. Pings
    run on a thread of their own, so they never wait behind deletes."""

    def __init__(self, health_servicer, db, interval_s, timeout_s, up_gauge):
        self._health = health_servicer
        self._db = db
        self._interval_s = interval_s
        self._timeout_s = timeout_s
        self._up = up_gauge
        self._indexes_checked = False
        self.first_check_done = asyncio.Event()
        self._thread = futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="mongo-health")
        self._task = None
        self._last_status = None

    def start(self):
        self._task = asyncio.ensure_future(self._run())

    def stop(self):
        if self._task:
            self._task.cancel()
        self._thread.shutdown(wait=False)

    def _ping(self):
        with pymongo.timeout(self._timeout_s):
            self._db.client.admin.command("ping")
            if not self._indexes_checked:  # once, when MongoDB first answers
                warn_about_missing_indexes(self._db)
                self._indexes_checked = True

    async def check(self):
        """Pings MongoDB once and publishes the result."""
        try:
            await asyncio.get_running_loop().run_in_executor(self._thread, self._ping)
            status = health_pb2.HealthCheckResponse.SERVING
        except Exception as error:  # Any failure to answer means not serving.
            status = health_pb2.HealthCheckResponse.NOT_SERVING
            problem = type(error).__name__
        self._up.set(1 if status == health_pb2.HealthCheckResponse.SERVING else 0)
        if status != self._last_status:  # Log the changes, not every ping.
            self._last_status = status
            if status == health_pb2.HealthCheckResponse.SERVING:
                log.info("health: SERVING, MongoDB answers")
            else:
                log.warning("health: NOT_SERVING, MongoDB does not answer a ping (%s)", problem)
        for service in ("", SERVICE_NAME):
            await self._health.set(service, status)
        self.first_check_done.set()

    async def _run(self):
        while True:
            await self.check()
            await asyncio.sleep(self._interval_s)


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
    admission = Admission(config.max_concurrent_rpcs, metrics.calls_in_flight)
    interceptors = [CallInterceptor(metrics),
                    *([BearerTokenInterceptor(config.auth_tokens)] if config.auth_tokens else []),
                    admission]
    # A second instance on the same port must fail, not share it.
    server = grpc.aio.server(interceptors=interceptors, options=[("grpc.so_reuseport", 0)])
    database_threads = futures.ThreadPoolExecutor(max_workers=config.max_workers, thread_name_prefix="mongo")
    pb2_grpc.add_ImageServiceServicer_to_server(
        servicer or ImageServiceServicer(db, config.mongo_timeout_s, database_threads, metrics), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if config.reflection:
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    address = f"{_host_in_uri(config.grpc_host)}:{config.grpc_port}"
    credentials = _server_credentials(config)
    port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    # NOT_SERVING until the first ping answers. Each ping waits at most an
    # interval, so a dead MongoDB shows as NOT_SERVING within two intervals.
    for service in ("", SERVICE_NAME):
        await health_servicer.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
    monitor = MongoHealthMonitor(health_servicer, db, config.health_interval_s,
                                 min(config.health_interval_s, config.mongo_timeout_s), metrics.mongodb_up)
    await server.start()
    monitor.start()
    endpoint = None
    if config.metrics_port is not None:
        endpoint, _ = prometheus_client.start_http_server(config.metrics_port, config.metrics_host,
                                                          registry=metrics.registry)
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


async def serve(config, db, describe, metrics):
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
             tls, ", bearer tokens" if config.auth_tokens else "", describe)
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
    """A mongomock database holding a few sample images, with the indexes."""
    import mongomock  # Only this mode needs it.

    db = mongomock.MongoClient()[config.mongo_db]
    create_indexes(db)  # as a well-kept database has them
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


def references_to(db, file_ids):
    """Which of these files an ``images`` document references now, in any
    spelling referenced_file_id accepts: the two canonical ones by index,
    and every odd string (upper case, spaces) read and parsed."""
    canonical = [*file_ids, *(str(file_id) for file_id in file_ids)]
    odd = {"$type": "string", "$not": re.compile("^[0-9a-f]{24}$")}
    documents = db.images.find({"$or": [{"image_id": {"$in": canonical}}, {"image_id": odd}]}, {"image_id": 1})
    return {referenced_file_id(document.get("image_id")) for document in documents} & set(file_ids)


def sweep_orphans(db, report, apply_files, batch_size):
    """Removes what the report found, ``batch_size`` ids per command: chunks
    without a file and metadata pointing at nothing, and unreferenced files
    only when ``apply_files``. Returns the number of documents removed."""
    removed = {"chunks": 0, "images": 0, "files": 0}
    for batch in in_batches(report.chunk_file_ids, batch_size):
        removed["chunks"] += db["fs.chunks"].delete_many({"files_id": {"$in": batch}}).deleted_count
    for batch in in_batches(report.dangling_metadata_ids, batch_size):
        removed["images"] += db.images.delete_many({"_id": {"$in": batch}}).deleted_count
    if apply_files:
        for batch in in_batches(report.unreferenced_file_ids, batch_size):
            # A file is gone for good: look once more for a reference made
            # since the scan.
            taken = references_to(db, batch)
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
    parser.add_argument("--create-indexes", action="store_true",
                        help="create the indexes deletes need (images.model_id, GridFS's on fs.chunks), then exit")
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
    args = parser.parse_args(argv)
    sweep_only = {"--apply": args.apply, "--apply-files": args.apply_files,
                  "--batch-size": args.batch_size is not None, "--min-age-s": args.min_age_s is not None}
    if not args.sweep_orphans and any(sweep_only.values()):
        parser.error(f"{', '.join(name for name, given in sweep_only.items() if given)} needs --sweep-orphans")
    if args.apply_files and not args.apply:
        parser.error("--apply-files needs --apply")
    if args.create_indexes and args.sweep_orphans:
        parser.error("--create-indexes and --sweep-orphans are separate runs")
    args.batch_size = 500 if args.batch_size is None else args.batch_size
    args.min_age_s = 3600.0 if args.min_age_s is None else args.min_age_s
    if args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    if not 0 <= args.min_age_s < float("inf"):
        parser.error("--min-age-s must be zero or more seconds")
    return args


def open_database(config, in_memory, event_listeners=()):
    """The database to serve, and how to describe it in the log."""
    if in_memory:
        return open_in_memory_database(config), f"in-memory stand-in/{config.mongo_db}"
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
        db, describe = open_database(config, args.in_memory, [CommandTimer(metrics.mongodb_command_duration)])
    except ConfigError as error:
        print(f"configuration error: {error}", file=sys.stderr)
        return 2
    configure_logging(config)
    if args.create_indexes:
        try:
            create_indexes(db)
        except pymongo.errors.PyMongoError as error:
            reason = redact(str(error).splitlines()[0], config.secrets)
            print(f"cannot create the indexes: {type(error).__name__}: {reason}", file=sys.stderr)
            return 1
        print(f"indexes present on {describe}: images {{model_id: 1}}, fs.chunks {{files_id: 1, n: 1}} (unique)")
        return 0
    if args.sweep_orphans:
        try:
            run_sweep(db, args)
        except pymongo.errors.PyMongoError as error:
            log.error("sweep failed, nothing more was changed: %s: %s", type(error).__name__, error)
            return 1
        return 0
    if args.in_memory:
        log.info("in-memory MongoDB stand-in with sample models %s; try: python3 image_service_client.py %s"
                 " --address 127.0.0.1:%d", ", ".join(SAMPLE_MODELS), next(iter(SAMPLE_MODELS)), config.grpc_port)
    try:
        asyncio.run(serve(config, db, describe, metrics))
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
