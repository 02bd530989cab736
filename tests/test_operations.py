"""Operating it: metrics, the index check and --create-indexes, the systemd
unit, and the orphan sweep."""

import asyncio
import datetime
import logging
import os
import re
import shutil
import subprocess
import sys
import urllib.error
import urllib.request

import mongomock
import pymongo
import pytest
from bson import ObjectId
from grpc_health.v1 import health_pb2, health_pb2_grpc

import image_service_observability as observability
import image_service_pb2 as pb2
import image_service_settings as service_settings
import image_service_store as store
import image_service_sweep as orphan_sweep
from mongo_standins import COLLATION_REFUSALS, NOT_ALLOWED_TO_LIST_COLLECTIONS, closed_port
from support import (
    EXACT_FILE_IDS,
    HERE,
    a_second_later,
    assert_store_consistent,
    delete,
    delete_batch,
    delete_directly,
    everything,
    images_of,
    model_data,
    run_server_process,
    serving,
    serving_on,
    store_under_exactly,
    store_under_hex_string_id,
    sweep,
    upload,
)


def scrape(port):
    """The /metrics page, as text and as {(name, labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as page:
        text = page.read().decode()
    samples = {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
               for family in text_string_to_metric_families(text) for sample in family.samples}
    return text, samples


def test_metrics_count_exactly_what_deletes_removed_and_name_no_model(database):
    upload(database, "secret-chair-model")
    upload(database, "secret-chair-model")
    with serving(database, metrics_port=0, metrics_host="127.0.0.1") as (stub_, running, channel):
        delete(stub_, "secret-chair-model")
        delete(stub_, "secret-chair-model")
        delete(stub_, "")
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        text, samples = scrape(running.running.metrics_port)
    method = "image_service.ImageService/DeleteImageByModelId"
    assert samples["image_service_images_deleted_total", ()] == 2
    assert samples["image_service_files_deleted_total", ()] == 2
    for outcome in ("OUTCOME_DELETED", "OUTCOME_NOTHING_TO_DELETE", "OUTCOME_INVALID_ARGUMENT"):
        assert samples["image_service_deletions_total", (("outcome", outcome),)] == 1
    assert samples["grpc_server_call_duration_seconds_count", (("grpc_method", method), ("grpc_status",
                                                                                         "OK"))] == 3
    assert samples["grpc_server_call_duration_seconds_count",
                   (("grpc_method", "grpc.health.v1.Health/Check"), ("grpc_status", "OK"))] == 1
    assert samples["image_service_mongodb_up", ()] == 1
    assert samples["image_service_calls_in_flight", ()] == 0
    assert "secret-chair" not in text and "127.0.0.1" not in text


@pytest.mark.parametrize("path", ["/", "/anything", "/metrics/more", "/favicon.ico"])
def test_metrics_answer_only_at_metrics_and_404_elsewhere(path):
    with serving(mongomock.MongoClient().db, metrics_port=0, metrics_host="127.0.0.1") as (_, running, _):
        port = running.running.metrics_port
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5)
        assert "image_service_mongodb_up 1.0" in scrape(port)[0]
    assert refused.value.code == 404


def test_a_dry_run_moves_no_deletion_counter(database):
    upload(database, "chair")
    with serving(database, metrics_port=0, metrics_host="127.0.0.1") as (stub_, running, _):
        stub_.DeleteImageByModelId(pb2.DeleteImageRequest(model_id="chair", validate_only=True), timeout=10)
        _, samples = scrape(running.running.metrics_port)
    assert samples["image_service_images_deleted_total", ()] == 0
    assert not any(name == "image_service_deletions_total" for name, _ in samples)


def test_mongodb_commands_are_timed_from_the_drivers_own_monitoring(wire):
    upload(wire.db, "chair")
    metrics = observability.Metrics()
    timer = observability.CommandTimer(metrics.mongodb_command_duration)
    client = wire.async_client(event_listeners=[timer])
    with serving_on(client, metrics=metrics, metrics_port=0, metrics_host="127.0.0.1") as (stub_, running, _):
        delete(stub_, "chair")
        _, samples = scrape(running.running.metrics_port)
    assert samples["image_service_mongodb_command_duration_seconds_count", (("command", "find"),)] == 2
    assert samples["image_service_mongodb_command_duration_seconds_count", (("command", "aggregate"),)] == 1
    assert samples["image_service_mongodb_command_duration_seconds_count", (("command", "delete"),)] == 3


def test_missing_indexes_are_warned_about_once_mongodb_answers(database, service_log):
    with serving(database):
        warnings = [r.getMessage() for r in service_log.records if r.getMessage().startswith("index missing")]
    assert len(warnings) == 3
    assert warnings[0].startswith("index missing on images {model_id: 1}: every delete scans")
    assert warnings[1].startswith("index missing on images {image_id: 1}: every delete scans")
    assert warnings[2].startswith("index missing on fs.chunks {files_id: 1, n: 1}")
    assert all("--create-indexes" in warning for warning in warnings)


def test_a_missing_index_is_warned_about_once_however_many_pings(database, service_log):
    with serving(database) as (_, running, _):
        for _ in range(5):  # pings after the first
            running.run(running.running.monitor.check())
    warnings = [r.getMessage() for r in service_log.records if r.getMessage().startswith("index missing")]
    assert len(warnings) == len(set(warnings)) == 3


NOT_AUTHORIZED = (13, "Unauthorized", "not authorized on CatalogServiceDB to execute command"
                                      " { listIndexes: \"images\", cursor: {}, $db: \"CatalogServiceDB\" }")


def test_a_user_not_allowed_to_list_indexes_gets_serving_health_and_working_deletes(wire):
    wire.refused["listIndexes"] = NOT_AUTHORIZED  # a role with find and remove only
    upload(wire.db, "chair")
    with serving_on(wire.async_client()) as (stub_, running, channel):
        running.run(running.running.monitor.check())
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        reply = delete(stub_, "chair")
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert (reply.success, reply.deleted_images) == (True, 1)


def test_an_index_check_not_authorized_is_one_warning_that_it_could_not_check(wire, service_log):
    wire.refused["listIndexes"] = NOT_AUTHORIZED
    with serving_on(wire.async_client()) as (_, running, _):
        for _ in range(5):
            running.run(running.running.monitor.check())
    warnings = [r for r in service_log.records if r.levelno >= logging.WARNING]
    (warning,) = warnings
    assert warning.getMessage().startswith("could not check the indexes: OperationFailure: not authorized on"
                                           " CatalogServiceDB to execute command { listIndexes:")
    assert warning.getMessage().endswith("; serving regardless (the check needs the listIndexes action)")
    assert "\n" not in warning.getMessage() and "full error" not in warning.getMessage()


def test_a_driver_failure_is_one_short_line_naming_each_host_and_its_reason():
    ports = closed_port(), closed_port()
    uri = f"mongodb://svc:secret-0123456789abcdef@127.0.0.1:{ports[0]},127.0.0.1:{ports[1]}/"
    with pymongo.MongoClient(uri, serverSelectionTimeoutMS=200) as client, \
            pytest.raises(pymongo.errors.ServerSelectionTimeoutError) as failed:
        client.admin.command("ping")
    described = observability.describe_failure(failed.value)
    assert set(described.split("; ")) == {f"127.0.0.1:{port}: connection refused" for port in ports}
    assert len(str(failed.value)) > 600  # the driver's own text, topology dump and all


def test_a_failure_naming_no_server_names_the_servers_it_tried():
    error = pymongo.errors.ServerSelectionTimeoutError(
        "No replica set members available for writes, Timeout: 5.0s, Topology Description:"
        " <TopologyDescription id: 1, topology_type: ReplicaSetNoPrimary, servers:"
        " [<ServerDescription ('db1.internal', 27017) server_type: RSSecondary, rtt: 0.001>,"
        " <ServerDescription ('::1', 27018) server_type: RSSecondary, rtt: 0.001>]>")
    assert observability.describe_failure(error) == (
        "no replica set members available for writes (tried db1.internal:27017, [::1]:27018)")


def test_the_load_runs_own_store_has_the_indexes_so_no_index_is_warned_about(service_log):
    from bench import load_image_service as load

    running, _ = load.start_in_memory(models=1, images=1, max_concurrent_rpcs=1)
    try:
        running.run(running.running.monitor.first_check_done.wait(), timeout_s=10)
    finally:
        running.stop(0)
    service_log.wait_for("health: SERVING")
    assert [r.getMessage() for r in service_log.records if "index missing" in r.getMessage()] == []


def test_create_indexes_creates_all_three_and_can_be_run_again(tmp_path, wire):
    for _ in range(2):
        done = run_server_process({"MONGO_URI": wire.uri}, "--create-indexes", cwd=tmp_path)
        assert done.returncode == 0, done.stderr
    assert store.missing_indexes(wire.db) == []
    assert wire.db["fs.chunks"].index_information()["files_id_1_n_1"]["unique"]


def test_create_indexes_on_a_real_server_creates_all_three_and_can_be_run_again(tmp_path, real_database,
                                                                                real_service_settings):
    for _ in range(2):
        done = run_server_process(real_service_settings, "--create-indexes", cwd=tmp_path)
        assert done.returncode == 0, done.stderr
    assert store.missing_indexes(real_database) == []
    assert real_database["fs.chunks"].index_information()["files_id_1_n_1"]["unique"]


def test_the_sweep_on_a_real_server_removes_orphans_as_the_operator_runs_it(tmp_path, real_database,
                                                                            real_service_settings):
    # On FerretDB v1 this met "$group accumulator "$max" is not implemented
    # yet": the sweep now tells a chunk's age without $max.
    upload(real_database, "chair")
    real_database["fs.chunks"].insert_one({"files_id": ObjectId("0" * 24), "n": 0, "data": b"left"})
    done = run_server_process(real_service_settings, "--sweep-orphans", "--apply", "--min-age-s", "0",
                              cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "removed 1 chunks, 0 images documents, 0 files" in done.stdout
    assert_store_consistent(real_database)


UNREACHABLE_TOOLS = {"--create-indexes": ("--create-indexes",),
                     "--sweep-orphans": ("--sweep-orphans", "--apply")}
TOOL_ACTIONS = {"--create-indexes": "cannot create the indexes",
                "--sweep-orphans": "sweep failed, nothing more was changed"}


@pytest.mark.parametrize("tool", UNREACHABLE_TOOLS)
def test_a_tool_that_cannot_reach_mongodb_says_so_in_one_shared_line_naming_the_settings(tmp_path, tool):
    port = closed_port()
    done = run_server_process({"MONGO_URI": f"mongodb://127.0.0.1:{port}/", "MONGO_TIMEOUT_MS": "300"},
                              *UNREACHABLE_TOOLS[tool], cwd=tmp_path)
    assert done.returncode == 1
    (line,) = done.stderr.strip().splitlines()
    assert line.endswith(f" ERROR image_service: {TOOL_ACTIONS[tool]}: cannot reach MongoDB at"
                         f" mongodb://127.0.0.1:{port}/CatalogServiceDB: 127.0.0.1:{port}:"
                         " connection refused; check MONGO_URI, or MONGO_HOST and MONGO_PORT")


def test_a_real_mongodb_test_run_that_cannot_reach_it_stops_at_once_with_one_line():
    port = closed_port()
    uri = f"mongodb://catalog:pa%2Fss-0123456789abcdef@127.0.0.1:{port}/?authSource=admin"
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"],
                          cwd=HERE, env={**os.environ, "TEST_MONGO_URI": uri}, capture_output=True, text=True,
                          timeout=10)
    assert done.returncode != 0
    assert (done.stdout + done.stderr).strip().splitlines() == [
        f"Exit: TEST_MONGO_URI mongodb://127.0.0.1:{port}/?authSource=admin does not answer within 3 s:"
        f" 127.0.0.1:{port}: connection refused"]


UNIT = os.path.join(HERE, "deploy", "image-service.service")


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze is not installed: install systemd to check the unit's sandbox")
def test_the_systemd_unit_is_sandboxed_and_verifies():
    security = subprocess.run(["systemd-analyze", "security", "--offline=true", UNIT],
                              capture_output=True, text=True, timeout=60)
    score = re.search(r"Overall exposure level for image-service.service: ([0-9.]+)", security.stdout)
    assert score and float(score.group(1)) <= 2.0, security.stdout[-500:]
    verify = subprocess.run(["systemd-analyze", "verify", UNIT], capture_output=True, text=True, timeout=60)
    assert (verify.stdout + verify.stderr).strip().splitlines() == [
        "image-service.service: Command /opt/image-service/.venv/bin/python3 is not executable:"
        " No such file or directory"]


def test_the_systemd_unit_waits_longer_than_the_drain():
    with open(UNIT) as unit:
        settings_ = dict(line.strip().split("=", 1) for line in unit if re.match(r"^[A-Za-z]+=", line))
    default = service_settings.load_config({})
    assert float(settings_["TimeoutStopSec"]) >= default.shutdown_delay_s + default.shutdown_grace_s + 5
    assert settings_["EnvironmentFile"] == "/etc/image-service/env" and settings_["Restart"] == "on-failure"


def old_service_leftovers(db):
    """A store as the old service left it, beside healthy models.

    The old service removed a model's first image only, and did so in steps
    that could stop half-way: a file document removed with its chunks left
    behind and its metadata still pointing at it; metadata removed with its
    file left behind.
    """
    upload(db, "chair")
    upload(db, "chair")
    half_deleted = upload(db, "table")
    upload(db, "table")
    db["fs.files"].delete_one({"_id": half_deleted})
    unreferenced = upload(db, "lamp")
    db.images.delete_one({"image_id": str(unreferenced)})
    (dangling,) = db.images.find({"image_id": str(half_deleted)})
    invalid = db.images.insert_one({"name": "sofa.jpg", "image_id": "not-an-id",
                                    "model_id": "sofa"}).inserted_id
    return {"chunks": [half_deleted], "files": [unreferenced], "metadata": {dangling["_id"], invalid}}


def test_the_orphan_report_finds_each_kind_of_leftover():
    db = mongomock.MongoClient().db
    expected = old_service_leftovers(db)
    report = orphan_sweep.find_orphans(db, min_age_s=0, now=a_second_later())
    assert report.chunk_file_ids == expected["chunks"]
    assert report.unreferenced_file_ids == expected["files"]
    assert set(report.dangling_metadata_ids) == expected["metadata"]


def test_files_and_chunks_younger_than_the_minimum_age_are_not_reported():
    db = mongomock.MongoClient().db
    old_service_leftovers(db)
    report = orphan_sweep.find_orphans(db, min_age_s=3600)
    assert (report.chunk_file_ids, report.unreferenced_file_ids) == ([], [])


def test_the_sweep_changes_nothing_without_apply():
    db = mongomock.MongoClient().db
    old_service_leftovers(db)
    before = everything(db)
    output = sweep(db)
    assert everything(db) == before
    assert "1  chunks without a file" in output and "report only: nothing changed" in output


def test_apply_removes_orphan_chunks_and_dangling_metadata_but_keeps_files():
    db = mongomock.MongoClient().db
    expected = old_service_leftovers(db)
    healthy = model_data(db, "chair")
    output = sweep(db, "--apply")
    assert db["fs.chunks"].count_documents({"files_id": expected["chunks"][0]}) == 0
    assert db.images.count_documents({"_id": {"$in": list(expected["metadata"])}}) == 0
    assert db["fs.files"].count_documents({"_id": expected["files"][0]}) == 1
    assert model_data(db, "chair") == healthy and len(images_of(db, "table")) == 1
    assert "removed 2 chunks, 2 images documents, 0 files" in output


def test_apply_files_removes_unreferenced_files_too_and_leaves_a_consistent_store():
    db = mongomock.MongoClient().db
    old_service_leftovers(db)
    healthy = model_data(db, "chair")
    sweep(db, "--apply", "--apply-files")
    assert_store_consistent(db)
    assert model_data(db, "chair") == healthy and len(images_of(db, "table")) == 1


def test_apply_files_keeps_a_file_referenced_since_the_scan():
    db = mongomock.MongoClient().db
    expected = old_service_leftovers(db)
    report = orphan_sweep.find_orphans(db, min_age_s=0, now=a_second_later())
    db.images.insert_one({"name": "lamp.jpg", "image_id": expected["files"][0], "model_id": "lamp"})
    removed = orphan_sweep.sweep_orphans(db, report, apply_files=True, batch_size=10)
    assert removed["files"] == 0
    assert db["fs.files"].count_documents({"_id": expected["files"][0]}) == 1


def test_the_sweep_reads_image_ids_as_the_delete_does():
    db = mongomock.MongoClient().db
    padded, upper = upload(db, "chair"), upload(db, "table")
    db.images.update_one({"model_id": "chair"}, {"$set": {"image_id": f" {padded} "}})
    db.images.update_one({"model_id": "table"}, {"$set": {"image_id": str(upper).upper()}})
    report = orphan_sweep.find_orphans(db, min_age_s=0, now=a_second_later())
    assert report == orphan_sweep.OrphanReport([], [], [])
    (reply,) = delete_directly(db, ["chair"])
    assert (reply.deleted_images, reply.deleted_files) == (1, 1)


def test_apply_files_keeps_a_file_referenced_since_the_scan_in_an_odd_spelling():
    db = mongomock.MongoClient().db
    expected = old_service_leftovers(db)
    report = orphan_sweep.find_orphans(db, min_age_s=0, now=a_second_later())
    (file_id,) = expected["files"]
    db.images.insert_one({"name": "lamp.jpg", "image_id": f" {str(file_id).upper()}", "model_id": "lamp"})
    removed = orphan_sweep.sweep_orphans(db, report, apply_files=True, batch_size=10)
    assert removed["files"] == 0
    assert db["fs.files"].count_documents({"_id": file_id}) == 1


def test_the_sweep_deletes_in_batches_of_the_given_size(wire):
    for number in range(5):
        gone = upload(wire.db, f"model-{number}")
        wire.db["fs.files"].delete_one({"_id": gone})
    with wire.client() as mongo:
        sweep(mongo["CatalogServiceDB"], "--apply", "--batch-size", "2")
    deletes = [c for c in wire.commands if "delete" in c]  # 5 orphan chunk sets, 5 dangling metadata
    sizes = [len(next(iter(c["deletes"][0]["q"].values()))["$in"]) for c in deletes]
    assert sizes == [2, 2, 1, 2, 2, 1]
    assert everything(wire.db) == {"images": [], "fs.files": [], "fs.chunks": []}


CASE_INSENSITIVE = {"locale": "en", "strength": 2}


def collation_of(command):
    """The collation a read names, or a delete names for its documents."""
    return command.get("collation") or command.get("deletes", [{}])[0].get("collation")


def sweep_commands_on(wire, collection):
    """The sweep's reads by id, groupings and deletes of ``collection`` (not its scans)."""
    return [command for command in wire.commands
            if collection in (command.get("delete"), command.get("aggregate"))
            or (command.get("find") == collection and command.get("filter"))]


@pytest.mark.parametrize("collection", ["images", "fs.files", "fs.chunks"])
def test_the_sweep_compares_ids_exactly_whatever_the_collections_collation(wire, collection):
    # A case-insensitive default would let a dangling string id match a healthy case variant.
    wire.create_collection(collection, collation=CASE_INSENSITIVE)
    old_service_leftovers(wire.db)
    with wire.client() as mongo:
        sweep(mongo["CatalogServiceDB"], "--apply", "--apply-files")
    exact = sweep_commands_on(wire, collection)
    assert exact and all(collation_of(command) == {"locale": "simple"} for command in exact)
    on_the_others = [command for command in wire.commands if next(iter(command.values())) != collection]
    assert not any(collation_of(command) for command in on_the_others)


def test_the_sweep_names_no_collation_on_a_collection_created_without_one(wire):
    old_service_leftovers(wire.db)
    with wire.client() as mongo:
        sweep(mongo["CatalogServiceDB"], "--apply", "--apply-files")
    assert wire.commands and not any(collation_of(command) for command in wire.commands)


def test_the_sweep_names_no_collation_on_a_server_that_does_not_implement_it(wire):
    wire.create_collection("images", collation=CASE_INSENSITIVE)
    wire.unimplemented = {"collation"}
    old_service_leftovers(wire.db)
    with wire.client() as mongo:
        sweep(mongo["CatalogServiceDB"], "--apply", "--apply-files")
    assert not any(collation_of(command) for command in wire.commands)
    assert orphan_sweep.find_orphans(wire.db, 0, a_second_later()) == orphan_sweep.OrphanReport([], [], [])


@pytest.mark.parametrize("refusal", NOT_ALLOWED_TO_LIST_COLLECTIONS.values(),
                         ids=NOT_ALLOWED_TO_LIST_COLLECTIONS.keys())
def test_the_sweep_names_the_simple_collation_when_the_user_may_not_list_collections(wire, refusal):
    wire.refused["listCollections"] = refusal
    old_service_leftovers(wire.db)
    with wire.client() as mongo:
        sweep(mongo["CatalogServiceDB"], "--apply", "--apply-files")
    exact = [command for collection in ("images", "fs.files", "fs.chunks")
             for command in sweep_commands_on(wire, collection)]
    assert exact and all(collation_of(command) == {"locale": "simple"} for command in exact)


@pytest.mark.parametrize("refusal", COLLATION_REFUSALS.values(), ids=COLLATION_REFUSALS.keys())
def test_the_sweep_of_a_user_who_may_not_list_collections_goes_without_a_collation_the_server_refuses(
        wire, refusal):
    wire.refused["listCollections"] = (13, "Unauthorized", "not authorized on CatalogServiceDB")
    wire.unimplemented, wire.unimplemented_code = {"collation"}, refusal
    old_service_leftovers(wire.db)
    with wire.client() as mongo:
        sweep(mongo["CatalogServiceDB"], "--apply", "--apply-files")
    # The refused read is not among the commands: only what was carried out.
    assert wire.commands and not any(collation_of(command) for command in wire.commands)
    assert orphan_sweep.find_orphans(wire.db, 0, a_second_later()) == orphan_sweep.OrphanReport([], [], [])


def test_the_sweep_changes_nothing_when_it_cannot_tell_how_a_collection_compares(wire):
    wire.refused["listCollections"] = (2, "BadValue", "listCollections refused")
    old_service_leftovers(wire.db)
    before = everything(wire.db)
    with wire.client() as mongo:
        with pytest.raises(pymongo.errors.OperationFailure, match="listCollections refused"):
            sweep(mongo["CatalogServiceDB"], "--apply", "--apply-files")
    assert everything(wire.db) == before


def test_the_sweep_runs_from_the_command_line(tmp_path, wire):
    expected = old_service_leftovers(wire.db)
    done = run_server_process({"MONGO_URI": wire.uri}, "--sweep-orphans", "--min-age-s", "0", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    chunks, files, metadata, verdict = done.stdout.splitlines()
    assert chunks == f"       1  chunks without a file (by files_id): {expected['chunks'][0]}"
    assert files == f"       1  files no images document references: {expected['files'][0]}"
    assert metadata.startswith("       2  images documents whose file is gone: ")
    assert verdict.startswith("report only: nothing changed")


@pytest.mark.parametrize("upper_case", [False, True], ids=["lower case", "upper case"])
def test_the_sweep_calls_a_file_under_its_hex_string_id_neither_unreferenced_nor_dangling(upper_case):
    db = mongomock.MongoClient().db
    file_id = store_under_hex_string_id(db, "chair", upper_case)
    report = orphan_sweep.find_orphans(db, min_age_s=0, now=a_second_later())
    assert report == orphan_sweep.OrphanReport([], [], [])
    removed = orphan_sweep.sweep_orphans(db, report, apply_files=True, batch_size=10)
    assert removed == {"chunks": 0, "images": 0, "files": 0}
    assert db["fs.files"].count_documents({"_id": file_id}) == 1


def test_apply_files_keeps_a_file_under_its_hex_string_id_referenced_since_the_scan():
    db = mongomock.MongoClient().db
    file_id = store_under_hex_string_id(db, "chair")
    db.images.delete_many({})
    report = orphan_sweep.find_orphans(db, min_age_s=0, now=a_second_later())
    assert report.unreferenced_file_ids == [file_id]
    db.images.insert_one({"name": "chair.jpg", "image_id": file_id.upper(), "model_id": "chair"})
    removed = orphan_sweep.sweep_orphans(db, report, apply_files=True, batch_size=10)
    assert removed["files"] == 0 and db["fs.files"].count_documents({"_id": file_id}) == 1


def test_a_delete_whose_caller_has_gone_is_still_counted_when_its_work_ends(wire, service_log):
    upload(wire.db, "chair")
    wire.hang()
    with serving_on(wire.async_client(timeout_ms=30_000), mongo_timeout_s=30,
                    max_concurrent_deletions=1, metrics_port=0,
                    metrics_host="127.0.0.1") as (stub_, running, _):
        call = stub_.DeleteImageByModelId.future(pb2.DeleteImageRequest(model_id="chair"))
        assert wire.arrivals.acquire(timeout=10)  # the read is held at MongoDB
        call.cancel()
        service_log.wait_for("status=CANCELLED")
        wire.recover()
        deletions = list(running.running.deletions)

        async def ended():  # the delete goes on to its end
            await asyncio.gather(*deletions)

        running.run(ended(), timeout_s=10)
        _, samples = scrape(running.running.metrics_port)
    assert images_of(wire.db, "chair") == []
    assert samples["image_service_images_deleted_total", ()] == 1
    assert samples["image_service_files_deleted_total", ()] == 1
    assert samples["image_service_deletions_total", (("outcome", "OUTCOME_DELETED"),)] == 1


def test_a_model_named_twice_in_a_batch_is_counted_once_in_the_metrics(database):
    upload(database, "chair")
    upload(database, "chair")
    with serving(database, metrics_port=0, metrics_host="127.0.0.1") as (stub_, running, _):
        delete_batch(stub_, ["chair", "chair"])
        _, samples = scrape(running.running.metrics_port)
    assert samples["image_service_images_deleted_total", ()] == 2
    assert samples["image_service_files_deleted_total", ()] == 2


def test_an_index_leading_with_the_field_in_either_direction_serves_with_more_fields_after_it(database):
    database.images.create_index([("model_id", -1), ("name", 1)])
    database.images.create_index([("image_id", -1), ("model_id", 1)])
    database["fs.chunks"].create_index([("files_id", 1), ("n", 1)], unique=True)
    assert store.missing_indexes(database) == []


def test_a_chunks_index_that_is_not_unique_is_missing(database):
    database.images.create_index([("model_id", 1)])
    database.images.create_index([("image_id", 1)])
    database["fs.chunks"].create_index([("files_id", 1), ("n", 1)])
    assert [(index.collection, index.unique) for index in store.missing_indexes(database)] == [
        ("fs.chunks", True)]


def test_the_sweep_reads_images_before_files_so_an_upload_during_its_scan_is_no_orphan(wire):
    upload(wire.db, "chair")
    # Between the scan's first read and its second, an upload writes its file, then its metadata.
    wire.faults[2] = lambda: upload(wire.db, "table")
    with wire.client() as mongo:
        report = orphan_sweep.find_orphans(mongo["CatalogServiceDB"], min_age_s=3600)
    assert report == orphan_sweep.OrphanReport([], [], [])


def test_the_sweep_never_calls_a_file_without_an_upload_date_unreferenced():
    db = mongomock.MongoClient().db
    file_id = upload(db, "chair")
    db["fs.files"].update_one({"_id": file_id}, {"$unset": {"uploadDate": ""}})
    db.images.delete_many({})  # its age unknown, it may be an upload in progress
    report = orphan_sweep.find_orphans(db, min_age_s=0, now=a_second_later())
    assert report.unreferenced_file_ids == []


@pytest.mark.parametrize("file_id", EXACT_FILE_IDS.values(), ids=EXACT_FILE_IDS.keys())
def test_the_sweep_keeps_an_image_and_its_file_stored_under_exactly_its_image_id(file_id):
    db = mongomock.MongoClient().db
    store_under_exactly(db, "chair", file_id)
    healthy = model_data(db, "chair")

    output = sweep(db, "--apply", "--apply-files")

    assert output.splitlines()[-1] == "removed 0 chunks, 0 images documents, 0 files"
    assert model_data(db, "chair") == healthy
    assert db["fs.files"].count_documents({"_id": file_id}) == 1


@pytest.mark.parametrize("file_id", EXACT_FILE_IDS.values(), ids=EXACT_FILE_IDS.keys())
def test_apply_files_keeps_a_file_under_exactly_an_image_id_given_since_the_scan(file_id):
    db = mongomock.MongoClient().db
    store_under_exactly(db, "chair", file_id)
    db.images.delete_many({})
    report = orphan_sweep.find_orphans(db, min_age_s=0, now=a_second_later())
    assert report.unreferenced_file_ids == [file_id]
    db.images.insert_one({"name": "chair.jpg", "image_id": file_id, "model_id": "chair"})

    removed = orphan_sweep.sweep_orphans(db, report, apply_files=True, batch_size=10)

    assert removed["files"] == 0 and db["fs.files"].count_documents({"_id": file_id}) == 1


def test_create_indexes_counts_an_equivalent_index_under_another_name_as_present(tmp_path, wire):
    wire.db.images.create_index([("model_id", 1)], name="by_model")

    for _ in range(2):
        done = run_server_process({"MONGO_URI": wire.uri}, "--create-indexes", cwd=tmp_path)
        assert done.returncode == 0, done.stderr

    created = [command["indexes"][0]["key"] for command in wire.commands if "createIndexes" in command]
    assert created == [{"image_id": 1}, {"files_id": 1, "n": 1}]
    assert store.missing_indexes(wire.db) == []
    assert "by_model" in wire.db.images.index_information()


def test_apply_files_counts_no_array_of_image_ids_as_a_reference():
    db = mongomock.MongoClient().db
    lost = upload(db, "lamp")
    db.images.delete_many({})
    db["fs.files"].insert_one({"_id": 1.5, "filename": "sofa.jpg", "length": 4, "chunkSize": 261120,
                               "uploadDate": datetime.datetime.now(datetime.timezone.utc)})
    report = orphan_sweep.find_orphans(db, min_age_s=0, now=a_second_later())
    # Since the scan, a writer stored an array: it names no file.
    db.images.insert_one({"name": "lamp.jpg", "image_id": [str(lost)], "model_id": "lamp"})

    removed = orphan_sweep.sweep_orphans(db, report, apply_files=True, batch_size=10)

    assert removed["files"] == 2 and db["fs.files"].count_documents({}) == 0

def chunks_of_a_lost_file(db, written):
    """Chunks whose fs.files document never came, each written at the given moment."""
    files_id = ObjectId()
    db["fs.chunks"].insert_many([{"_id": ObjectId.from_datetime(moment), "files_id": files_id, "n": n,
                                  "data": b"jpeg"} for n, moment in enumerate(written)])
    return files_id


def test_chunks_without_a_file_are_orphans_only_once_their_newest_chunk_is_older_than_the_minimum_age():
    db = mongomock.MongoClient().db
    now = datetime.datetime.now(datetime.timezone.utc)
    hours_ago = [now - datetime.timedelta(hours=hours) for hours in (4, 3, 2)]
    chunks_of_a_lost_file(db, [hours_ago[0], now - datetime.timedelta(minutes=1)])  # still being written
    orphaned = chunks_of_a_lost_file(db, hours_ago[1:])

    report = orphan_sweep.find_orphans(db, min_age_s=3600, now=now)

    assert report.chunk_file_ids == [orphaned]


def test_chunks_without_a_file_whose_age_cannot_be_told_are_not_orphans():
    db = mongomock.MongoClient().db
    db["fs.chunks"].insert_one({"_id": "chunk-0", "files_id": ObjectId(), "n": 0, "data": b"jpeg"})

    report = orphan_sweep.find_orphans(db, min_age_s=0, now=a_second_later())

    assert report.chunk_file_ids == []


def test_an_image_naming_no_file_is_dangling_and_a_file_no_image_id_can_name_is_unreferenced():
    db = mongomock.MongoClient().db
    invalid = db.images.insert_one({"name": "chair.jpg", "image_id": None, "model_id": "chair"}).inserted_id
    # GridFS allows any _id; an image_id naming a file is never a float.
    db["fs.files"].insert_one({"_id": 1.5, "filename": "lamp.jpg", "length": 4, "chunkSize": 261120,
                               "uploadDate": datetime.datetime.now(datetime.timezone.utc)})

    report = orphan_sweep.find_orphans(db, min_age_s=0, now=a_second_later())

    assert report == orphan_sweep.OrphanReport([], [1.5], [invalid])


@pytest.mark.parametrize("keys", [[("files_id", 1), ("n", -1)], [("files_id", 1), ("n", 1), ("data", 1)]],
                         ids=["another direction", "more fields"])
def test_a_unique_chunks_index_other_than_gridfs_own_is_missing(database, keys):
    database.images.create_index([("model_id", 1)])
    database.images.create_index([("image_id", 1)])
    database["fs.chunks"].create_index(keys, unique=True)
    assert [(index.collection, index.unique) for index in store.missing_indexes(database)] == [
        ("fs.chunks", True)]


GRIDFS_CHUNKS_INDEX = {"files_id_1_n_1": {"key": [("files_id", 1), ("n", 1)], "unique": True}}


@pytest.mark.parametrize("options", [{"partialFilterExpression": {"name": {"$exists": True}}},
                                     {"collation": {"locale": "en", "strength": 2}}],
                         ids=["partial", "case-insensitive collation"])
def test_an_index_deletes_cannot_use_is_missing(options):
    # The deletion's reads match every document, comparing strings exactly:
    # a partial index, or one with a collation other than simple, cannot serve them.
    present = {"images": {"by_model": {"key": [("model_id", 1)], **options},
                          "image_id_1": {"key": [("image_id", 1)]}},
               "fs.chunks": GRIDFS_CHUNKS_INDEX}
    assert [(index.collection, index.keys) for index in store.missing_from(present)] == [
        ("images", (("model_id", 1),))]


def test_the_sweep_keeps_the_chunks_of_a_file_stored_under_another_spelling_of_its_id():
    db = mongomock.MongoClient().db
    file_id = upload(db, "chair")
    # A writer gave the chunks the hex string of their file's ObjectId: the
    # delete finds them under either spelling, so they are that file's.
    db["fs.chunks"].update_many({"files_id": file_id}, {"$set": {"files_id": str(file_id)}})
    healthy = list(db["fs.chunks"].find())

    output = sweep(db, "--apply", "--apply-files")

    assert output.splitlines()[-1] == "removed 0 chunks, 0 images documents, 0 files"
    assert list(db["fs.chunks"].find()) == healthy


def test_create_indexes_never_reports_as_created_an_index_that_is_still_missing(tmp_path, real_database,
                                                                               real_service_settings):
    # GridFS's index, but not unique, under GridFS's own name.
    real_database["fs.chunks"].create_index([("files_id", 1), ("n", 1)])

    done = run_server_process(real_service_settings, "--create-indexes", cwd=tmp_path)

    if done.returncode == 0:
        assert store.missing_indexes(real_database) == [], done.stdout
    else:  # MongoDB refuses the same name with other options: the line must say why.
        assert "cannot create the indexes" in done.stderr
