"""The fixtures every test file shares: databases (mongomock, a real MongoDB when
TEST_MONGO_URI is set, the wire-level stand-in), the service log, TLS
certificates."""

import logging
import os

import mongomock
import pymongo
import pytest

import image_service_server as server
from image_service_observability import describe_failure
from image_service_settings import _uri_passwords, redact
from mongo_standins import WireMongo
from support import LogWatcher, empty_real_database, serving, upload

MONGO_ANSWER_WITHIN_S = 3


def _without_credentials(uri):
    """A connection string as it may be shown: no user, no password (the
    credentials end at the last @ before the options, whatever they hold)."""
    scheme, _, rest = uri.partition("://")
    before_options, question_mark, options = rest.partition("?")
    return f"{scheme}://{before_options.rpartition('@')[2]}{question_mark}{options}"


def pytest_configure(config):
    """A run on a real MongoDB (TEST_MONGO_URI) that cannot reach it stops at
    once with one line, rather than failing every test after a timeout."""
    uri = os.environ.get("TEST_MONGO_URI")
    if not uri:
        return
    ms = MONGO_ANSWER_WITHIN_S * 1000
    try:
        with pymongo.MongoClient(uri, serverSelectionTimeoutMS=ms, connectTimeoutMS=ms) as mongo:
            mongo.admin.command("ping")
    except Exception as error:  # Whatever the reason, no test on it can pass.
        problem = (f"does not answer within {MONGO_ANSWER_WITHIN_S} s"
                   if isinstance(error, pymongo.errors.ConnectionFailure) else "cannot be used")
        reason = redact(describe_failure(error), _uri_passwords(uri))
        pytest.exit(f"TEST_MONGO_URI {_without_credentials(uri)} {problem}: {reason}",
                    returncode=pytest.ExitCode.USAGE_ERROR)


@pytest.fixture
def service_log():
    watcher = LogWatcher()
    server.log.addHandler(watcher)
    previous = server.log.level
    server.log.setLevel(logging.DEBUG)
    yield watcher
    server.log.setLevel(previous)
    server.log.removeHandler(watcher)


@pytest.fixture(params=["mongomock", "real MongoDB"])
def database(request):
    """An empty database: mongomock, and a real MongoDB if TEST_MONGO_URI says where."""
    if request.param == "mongomock":
        yield mongomock.MongoClient()["CatalogServiceDB"]
        return
    yield from empty_real_database()


@pytest.fixture
def real_database():
    """An empty database on the real MongoDB (or FerretDB) of TEST_MONGO_URI."""
    yield from empty_real_database()


@pytest.fixture
def real_service_settings(real_database):
    """The environment a service process needs to serve ``real_database``."""
    return {"MONGO_URI": os.environ["TEST_MONGO_URI"], "MONGO_DB": real_database.name}


@pytest.fixture
def stub(database):
    with serving(database) as (stub_, _, _):
        yield stub_


@pytest.fixture
def wire():
    stand_in = WireMongo()
    yield stand_in
    stand_in.stop()


@pytest.fixture
def tls_files(tmp_path, certificates):
    """Good files, plus a garbage one, an empty one and a key of another certificate."""
    import trustme

    other = trustme.CA().issue_cert("127.0.0.1")
    files = {"garbage": tmp_path / "garbage.pem", "empty": tmp_path / "empty.pem",
             "other_key": tmp_path / "other.key"}
    files["garbage"].write_text("not a certificate")
    files["empty"].write_text("")
    other.private_key_pem.write_to_path(files["other_key"])
    return {**certificates, **{name: str(path) for name, path in files.items()}}


@pytest.fixture(scope="module")
def certificates(tmp_path_factory):
    """A CA, a server certificate for 127.0.0.1 and a client certificate, as files."""
    import trustme

    folder = tmp_path_factory.mktemp("certificates")
    ca = trustme.CA()
    files = {"ca": folder / "ca.pem", "cert": folder / "server.pem", "key": folder / "server.key",
             "client_cert": folder / "client.pem", "client_key": folder / "client.key"}
    ca.cert_pem.write_to_path(files["ca"])
    server_cert = ca.issue_cert("127.0.0.1", "localhost")
    server_cert.private_key_pem.write_to_path(files["key"])
    server_cert.cert_chain_pems[0].write_to_path(files["cert"])
    client_cert = ca.issue_cert("catalog-service@example.internal")
    client_cert.private_key_pem.write_to_path(files["client_key"])
    client_cert.cert_chain_pems[0].write_to_path(files["client_cert"])
    return {name: str(path) for name, path in files.items()}


@pytest.fixture
def root_logging():
    """Puts the root and the service's loggers back as they were after configure_logging."""
    root = logging.getLogger()
    handlers, level, service_level = root.handlers[:], root.level, server.log.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    server.log.setLevel(service_level)


@pytest.fixture(scope="module")
def fuzzed_server():
    db = mongomock.MongoClient().db
    upload(db, "chair")
    with serving(db) as (stub_, _, channel):
        yield db, stub_, channel
