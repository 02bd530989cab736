"""The contract and the deletion: what a delete removes and leaves, in what
order and how many commands, under failures, faults and arbitrary input;
batches, dry runs and request ids."""

import collections
import datetime
import filecmp
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
import types

import grpc
import mongomock
import pymongo
import pymongo.monitoring
import pytest
from bson import ObjectId
from hypothesis import given, settings
from hypothesis import strategies as st

import image_service_client as client_cli
import image_service_observability as observability
import image_service_pb2 as pb2
import image_service_server as server
import image_service_settings as service_settings
import image_service_store as store
from mongo_standins import (
    COLLATION_REFUSALS,
    NOT_ALLOWED_TO_LIST_COLLECTIONS,
    WireMongo,
    closed_port,
    silent_socket,
    synthetic_mongo,
)
from support import (
    EXACT_FILE_IDS,
    HERE,
    IMAGE,
    QUERY_LOOK_ALIKES,
    ServerProcess,
    assert_store_consistent,
    delete,
    delete_batch,
    delete_before,
    delete_directly,
    everything,
    images_of,
    model_data,
    serving,
    serving_on,
    store_again_under_its_hex_string,
    store_under_exactly,
    store_under_hex_string_id,
    upload,
)


def test_uploads_in_tests_are_shaped_like_the_upload_service():
    db = mongomock.MongoClient().db
    file_id = upload(db, "chair")
    (metadata,) = images_of(db, "chair")
    assert set(metadata) == {"_id", "name", "image_id", "model_id"}
    assert metadata["image_id"] == str(file_id) and metadata["name"] == "chair.jpg"
    stored = db["fs.files"].find_one({"_id": file_id})
    assert stored["filename"] == "chair.jpg" and stored["length"] == len(IMAGE)
    assert stored["chunkSize"] == 255 * 1024 and isinstance(stored["uploadDate"], datetime.datetime)
    chunks = sorted(db["fs.chunks"].find({"files_id": file_id}), key=lambda c: c["n"])
    assert [c["n"] for c in chunks] == [0, 1]
    assert b"".join(c["data"] for c in chunks) == IMAGE


def test_the_readmes_command_regenerates_the_committed_stubs(tmp_path):
    with open(os.path.join(HERE, "README.md"), encoding="utf-8") as file:
        (command,) = [line for line in file.read().splitlines()
                      if line.startswith(".venv/bin/python -m grpc_tools.protoc")]
    shutil.copy(os.path.join(HERE, "image_service.proto"), tmp_path)
    # As written, from a checkout holding the proto, with this venv's python.
    argv = [sys.executable, *shlex.split(command)[1:]]
    assert subprocess.run(argv, cwd=tmp_path).returncode == 0
    for name in ("image_service_pb2.py", "image_service_pb2.pyi", "image_service_pb2_grpc.py"):
        assert filecmp.cmp(tmp_path / name, os.path.join(HERE, name), shallow=False), (
            f"{name} is stale: regenerate it with the README's command")


def test_the_original_contract_is_unchanged():
    service = pb2.DESCRIPTOR.services_by_name["ImageService"]
    assert pb2.DESCRIPTOR.package == "image_service"
    method = service.methods_by_name["DeleteImageByModelId"]
    assert (method.input_type.name, method.output_type.name) == ("DeleteImageRequest", "DeleteImageResponse")
    request = pb2.DeleteImageRequest.DESCRIPTOR.fields_by_name["model_id"]
    assert (request.number, request.type) == (1, request.TYPE_STRING)
    reply = pb2.DeleteImageResponse.DESCRIPTOR.fields_by_name
    assert (reply["success"].number, reply["success"].type) == (1, reply["success"].TYPE_BOOL)
    assert (reply["message"].number, reply["message"].type) == (2, reply["message"].TYPE_STRING)


def test_every_proto_element_is_commented():
    with open(os.path.join(HERE, "image_service.proto")) as proto:
        lines = [line.strip() for line in proto]
    for number, line in enumerate(lines):
        declares = line.startswith(("service ", "rpc ", "message ", "enum ", "OUTCOME_", "string ", "bool ",
                                    "int32 ", "repeated ", "Outcome "))
        if declares:
            assert lines[number - 1].startswith("//"), f"no comment above: {line}"


def test_deletes_every_image_of_a_model_with_its_files_and_chunks(database, stub):
    for _ in range(3):
        upload(database, "chair")

    reply = delete(stub, "chair")

    assert (reply.success, reply.outcome) == (True, pb2.OUTCOME_DELETED)
    assert (reply.deleted_images, reply.deleted_files, reply.model_id) == (3, 3, "chair")
    assert reply.message == "deleted 3 images and 3 files"
    assert everything(database) == {"images": [], "fs.files": [], "fs.chunks": []}


def test_leaves_every_other_model_untouched(database, stub):
    upload(database, "chair")
    for bystander in ("table", "chair2", "Chair"):
        upload(database, bystander)
    before = {m: model_data(database, m) for m in ("table", "chair2", "Chair")}

    delete(stub, "chair")

    assert {m: model_data(database, m) for m in before} == before
    assert_store_consistent(database)


def test_follows_image_ids_stored_as_objectids(database, stub):
    file_id = upload(database, "chair")
    database.images.update_one({"image_id": str(file_id)}, {"$set": {"image_id": file_id}})

    reply = delete(stub, "chair")

    assert (reply.deleted_images, reply.deleted_files) == (1, 1)
    assert everything(database) == {"images": [], "fs.files": [], "fs.chunks": []}


def test_a_hex_model_id_also_matches_model_ids_stored_as_objectids(database, stub):
    model = ObjectId()
    upload(database, str(model))
    upload(database, str(model))
    database.images.update_one({"model_id": str(model)}, {"$set": {"model_id": model}})

    reply = delete(stub, str(model))

    assert (reply.deleted_images, reply.deleted_files) == (2, 2)
    assert everything(database)["images"] == []


def test_an_upper_case_hex_id_does_not_match_the_objectid(database, stub):
    model = ObjectId()
    upload(database, str(model))
    database.images.update_one({"model_id": str(model)}, {"$set": {"model_id": model}})

    reply = delete(stub, str(model).upper())

    assert reply.outcome == pb2.OUTCOME_NOTHING_TO_DELETE
    assert database.images.count_documents({"model_id": model}) == 1


@pytest.mark.parametrize("look_alike", [" chair", "chair ", "CHAIR", "chai", "chair\u200b", ".*", "^chair$",
                                        '{"$ne": null}', "{'$gt': ''}", "$where"])
def test_matches_the_model_id_exactly(database, stub, look_alike):
    upload(database, "chair")
    before = everything(database)

    reply = delete(stub, look_alike)

    assert (reply.success, reply.outcome) == (True, pb2.OUTCOME_NOTHING_TO_DELETE)
    assert everything(database) == before


def test_metadata_pointing_at_a_file_already_gone_is_removed_and_reported(database, stub):
    gone = upload(database, "chair")
    upload(database, "chair")
    database["fs.files"].delete_one({"_id": gone})
    database["fs.chunks"].delete_many({"files_id": gone})

    reply = delete(stub, "chair")

    assert (reply.success, reply.deleted_images, reply.deleted_files) == (True, 2, 1)
    assert "1 reference to a file already gone" in reply.message
    assert everything(database) == {"images": [], "fs.files": [], "fs.chunks": []}


@pytest.mark.parametrize("image_id", [None, ["not", "one"], {"id": 1}, True])
def test_metadata_whose_image_id_names_no_file_is_removed_and_reported(database, stub, image_id):
    database.images.insert_one({"name": "chair.jpg", "image_id": image_id, "model_id": "chair"})

    reply = delete(stub, "chair")

    assert (reply.success, reply.deleted_images, reply.deleted_files) == (True, 1, 0)
    assert "1 reference had no valid file id" in reply.message
    assert images_of(database, "chair") == []


@pytest.mark.parametrize("file_id", EXACT_FILE_IDS.values(), ids=EXACT_FILE_IDS.keys())
def test_a_file_stored_under_exactly_its_image_id_is_deleted_with_its_chunks(database, stub, file_id):
    store_under_exactly(database, "chair", file_id)
    upload(database, "table")
    table = model_data(database, "table")

    reply = delete(stub, "chair")

    assert (reply.success, reply.deleted_images, reply.deleted_files) == (True, 1, 1)
    assert reply.message == "deleted 1 image and 1 file"
    assert model_data(database, "table") == table
    assert database["fs.files"].count_documents({"_id": file_id}) == 0
    assert database["fs.chunks"].count_documents({"files_id": file_id}) == 0


@pytest.mark.parametrize("file_id", EXACT_FILE_IDS.values(), ids=EXACT_FILE_IDS.keys())
def test_a_file_stored_under_exactly_its_image_id_is_kept_while_another_model_names_it(database, stub,
                                                                                       file_id):
    store_under_exactly(database, "chair", file_id)
    database.images.insert_one({"name": "copy.jpg", "image_id": file_id, "model_id": "table"})

    reply = delete(stub, "chair")

    assert (reply.success, reply.deleted_images, reply.deleted_files) == (True, 1, 0)
    assert "kept 1 file still referenced by another model" in reply.message
    assert database["fs.files"].count_documents({"_id": file_id}) == 1


@pytest.mark.parametrize("file_id", EXACT_FILE_IDS.values(), ids=EXACT_FILE_IDS.keys())
def test_an_image_id_naming_no_stored_file_exactly_is_a_reference_to_a_file_already_gone(database, stub,
                                                                                        file_id):
    database.images.insert_one({"name": "chair.jpg", "image_id": file_id, "model_id": "chair"})

    reply = delete(stub, "chair")

    assert (reply.success, reply.deleted_images, reply.deleted_files) == (True, 1, 0)
    assert "1 reference to a file already gone" in reply.message


def test_a_model_without_images_succeeds_with_nothing_to_delete(database, stub):
    upload(database, "table")
    reply = delete(stub, "chair")
    assert (reply.success, reply.outcome, reply.deleted_images) == (True, pb2.OUTCOME_NOTHING_TO_DELETE, 0)
    assert reply.model_id == "chair" and "nothing to delete" in reply.message


def test_repeating_a_delete_is_safe(database, stub):
    upload(database, "chair")
    upload(database, "table")
    first, second = delete(stub, "chair"), delete(stub, "chair")
    assert (first.outcome, second.outcome) == (pb2.OUTCOME_DELETED, pb2.OUTCOME_NOTHING_TO_DELETE)
    assert second.success and len(images_of(database, "table")) == 1


REJECTED = {
    "empty": ("", "model_id is empty"),
    "too long": ("m" * 257, "model_id is longer than 256 characters"),
    "NUL": ("chair\x00", "model_id contains control characters"),
    "newline": ("chair\n", "model_id contains control characters"),
    "tab": ("\tchair", "model_id contains control characters"),
    "DEL": ("chair\x7f", "model_id contains control characters"),
    "C1 control": ("chair\x85", "model_id contains control characters"),
}


@pytest.mark.parametrize("model_id, reason", REJECTED.values(), ids=REJECTED.keys())
def test_rejects_bad_model_ids_and_touches_nothing(database, stub, model_id, reason):
    upload(database, "chair")
    upload(database, model_id.replace("\x00", ""))
    before = everything(database)

    reply = delete(stub, model_id)

    assert (reply.success, reply.outcome, reply.message) == (False, pb2.OUTCOME_INVALID_ARGUMENT, reason)
    assert everything(database) == before


def test_accepts_a_model_id_of_exactly_256_characters(database, stub):
    upload(database, "m" * 256)
    assert delete(stub, "m" * 256).deleted_images == 1


def test_a_body_that_does_not_parse_is_invalid_argument_with_one_warning_and_no_traceback(
        database, caplog, service_log):
    upload(database, "chair")
    invalid_utf8 = pb2.DeleteImageRequest(model_id="chair").SerializeToString().replace(b"chair", b"ch\xffir")
    truncated = pb2.DeleteImageRequest(model_id="chair").SerializeToString()[:-2]
    with serving(database) as (_, _, channel):
        raw_call = channel.unary_unary("/image_service.ImageService/DeleteImageByModelId")
        for body in (invalid_utf8, truncated):
            with pytest.raises(grpc.RpcError) as refused:
                raw_call(body, timeout=5)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "not a valid message" in refused.value.details()
            record = service_log.wait_for("status=INVALID_ARGUMENT")
            assert record.levelname == "WARNING" and record.exc_info is None
            assert [r for r in service_log.records if "DeleteImageByModelId" in r.getMessage()] == [record]
            assert "Traceback" not in caplog.text
            service_log.records.clear()
    assert len(images_of(database, "chair")) == 1


def test_a_model_id_of_megabytes_is_invalid_and_echoed_cut(database, stub):
    upload(database, "chair")
    huge = "m" * 3_000_000
    reply = delete(stub, huge)
    assert (reply.success, reply.outcome) == (False, pb2.OUTCOME_INVALID_ARGUMENT)
    assert reply.model_id == "m" * 256 + "...[cut from 3000000 characters]"
    assert reply.ByteSize() < 1024
    assert len(images_of(database, "chair")) == 1


def test_a_batch_of_1000_maximal_invalid_ids_gets_a_reply_a_client_can_receive(database, stub):
    # As long as the ids can be while the request stays under gRPC's 4 MB receive limit.
    model_ids = [f"{i:04d}" + "x" * 4146 for i in range(1000)]
    assert pb2.DeleteImagesRequest(model_ids=model_ids).ByteSize() < 4 * 1024 * 1024
    results = delete_batch(stub, model_ids)  # would be RESOURCE_EXHAUSTED past the client's 4 MB
    assert {result.outcome for result in results} == {pb2.OUTCOME_INVALID_ARGUMENT}
    assert [result.model_id[:4] for result in results] == [model_id[:4] for model_id in model_ids]
    assert pb2.DeleteImagesResponse(results=results).ByteSize() < 512 * 1024


def test_one_line_is_logged_per_call(database, stub, caplog):
    upload(database, "chair")
    with caplog.at_level(logging.INFO, logger="image_service"):
        delete(stub, "chair")
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("DeleteImageByModelId")]
    assert "model_id='chair' outcome=OUTCOME_DELETED deleted_images=1 deleted_files=1 ms=" in line


# The read, the reference check, then deletes of files, chunks and metadata:
ONE_ROUND = ["find", "aggregate", "delete", "delete", "delete"]


def test_a_delete_costs_six_commands_whatever_the_number_of_images_in_a_round(wire):
    for _ in range(25):
        upload(wire.db, "chair")
    with serving_on(wire.async_client()) as (stub_, _, _):
        reply = delete(stub_, "chair")
    assert reply.deleted_images == 25
    assert wire.names() == [*ONE_ROUND, "find"]  # the read sent with the last delete finds none left


def test_deletes_files_then_chunks_then_the_metadata_it_read(wire):
    upload(wire.db, "chair")
    with serving_on(wire.async_client()) as (stub_, _, _):
        delete(stub_, "chair")
    read, check, files, chunks, metadata, last_read = wire.commands
    assert (read["find"], check["aggregate"], last_read["find"]) == ("images", "images", "images")
    assert "image_id" in str(check["pipeline"])  # other models' references to the files
    assert (files["delete"], chunks["delete"], metadata["delete"]) == ("fs.files", "fs.chunks", "images")
    # The documents read, by _id, and only while they are still the model's.
    assert set(metadata["deletes"][0]["q"]) == {"_id", "model_id"}
    assert metadata["deletes"][0]["q"]["model_id"]["$in"] == ["chair"]


def test_the_read_for_what_is_left_is_sent_with_the_images_delete_and_leaves_out_what_it_deletes(wire):
    for _ in range(3):
        upload(wire.db, "chair")
    wire.reads_first = True  # MongoDB may answer the read before the delete sent with it
    with serving_on(wire.async_client()) as (stub_, _, _):
        reply = delete(stub_, "chair")
    assert (reply.success, reply.deleted_images, reply.deleted_files) == (True, 3, 3)
    assert reply.message == "deleted 3 images and 3 files"
    assert wire.names() == ["find", "aggregate", "delete", "delete", "find", "delete"]
    assert wire.unpaired == [], "the read was not sent until the delete was answered"
    assert everything(wire.db) == {"images": [], "fs.files": [], "fs.chunks": []}


def test_a_document_the_delete_missed_is_found_by_a_read_after_it_and_counted_once(wire):
    for _ in range(3):
        upload(wire.db, "chair")
    wire.deletes_missing = 1
    with serving_on(wire.async_client()) as (stub_, _, _):
        reply = delete(stub_, "chair")
    assert (reply.success, reply.deleted_images, reply.deleted_files) == (True, 3, 3)
    # Missed, not removed by another deleter: the message says nothing of one.
    assert reply.message == "deleted 3 images and 3 files"
    # The read sent with the delete left the missed document out; the one after it found it.
    assert wire.names() == [*ONE_ROUND, "find", "find", "delete", "find"]
    assert everything(wire.db) == {"images": [], "fs.files": [], "fs.chunks": []}


def test_a_model_with_a_million_images_is_deleted_by_repeating_the_call_with_exact_totals():
    default_budget_s = service_settings.Config.mongo_timeout_s
    with (synthetic_mongo("huge", 1_000_000) as uri,
          serving_on(pymongo.AsyncMongoClient(uri), mongo_timeout_s=default_budget_s) as (stub_, _, _)):
        replies = []
        while not replies or not replies[-1].success:
            replies.append(stub_.DeleteImageByModelId(pb2.DeleteImageRequest(model_id="huge"), timeout=60))
            assert len(replies) < 100, "no progress"
        with pymongo.MongoClient(uri) as client:
            report = client.admin.command("report")
    assert sum(reply.deleted_images for reply in replies) == 1_000_000
    assert sum(reply.deleted_files for reply in replies) == 1_000_000
    assert report["present"] == {"images": 0, "fs.files": 0, "fs.chunks": 0}
    cut_short = replies[:-1]
    assert all(not reply.success and reply.outcome in (pb2.OUTCOME_INCOMPLETE, pb2.OUTCOME_UNAVAILABLE)
               for reply in cut_short)
    assert all(reply.deleted_images > 0 for reply in cut_short), "every call makes progress"
    assert max(size for _, _, size in report["commands"]) < 2 * 1024 * 1024  # MongoDB's limit: 16 MB
    if all(reply.outcome == pb2.OUTCOME_INCOMPLETE for reply in cut_short):  # no round was cut midway
        commands = [(name, collection) for name, collection, _ in report["commands"]]
        read = ("find", "images")
        # A full round reads what is left after its images delete, not with it.
        one_round = [("aggregate", "images"), ("delete", "fs.files"), ("delete", "fs.chunks"),
                     ("delete", "images"), read]
        # Each call's read, then its rounds of 10,000: 100 in all, whatever the number of calls.
        expected = [entry for reply in replies
                    for entry in [read, *one_round * (reply.deleted_images // 10_000)]]
        assert commands == expected


def test_a_model_without_images_costs_one_read(wire):
    with serving_on(wire.async_client()) as (stub_, _, _):
        delete(stub_, "chair")
    assert wire.names() == ["find"]


@pytest.mark.parametrize("command", [2, 3, 4, 5], ids=["check", "delete-files", "delete-chunks",
                                                       "delete-metadata"])
def test_an_image_uploaded_before_the_last_read_is_answered_is_deleted_too_before_success(wire, command):
    upload(wire.db, "chair")
    upload(wire.db, "table")
    bystander = model_data(wire.db, "table")
    wire.faults[command] = lambda: upload(wire.db, "chair")
    with serving_on(wire.async_client()) as (stub_, _, _):
        reply = delete(stub_, "chair")
    assert (reply.success, reply.deleted_images, reply.deleted_files) == (True, 2, 2)
    assert images_of(wire.db, "chair") == []
    assert wire.names() == [*ONE_ROUND, *ONE_ROUND, "find"]
    assert model_data(wire.db, "table") == bystander
    assert_store_consistent(wire.db)


def test_an_image_uploaded_after_the_last_read_while_the_last_delete_runs_is_left_for_the_next_call(wire):
    # The price of sending a small round's last read with its delete: when
    # MongoDB answers the read first, an upload landing before the delete
    # runs is seen by neither. Success is answered; the next call deletes it.
    upload(wire.db, "chair")
    upload(wire.db, "table")
    bystander = model_data(wire.db, "table")
    wire.reads_first = True
    wire.faults[6] = lambda: upload(wire.db, "chair")  # the images delete, after the read was answered
    with serving_on(wire.async_client()) as (stub_, _, _):
        first = delete(stub_, "chair")
        assert (first.success, first.deleted_images, first.deleted_files) == (True, 1, 1)
        assert len(images_of(wire.db, "chair")) == 1
        second = delete(stub_, "chair")
    assert (second.success, second.deleted_images, second.deleted_files) == (True, 1, 1)
    assert images_of(wire.db, "chair") == []
    assert model_data(wire.db, "table") == bystander
    assert_store_consistent(wire.db)


def test_the_images_delete_names_the_model_so_another_models_document_under_the_id_is_kept(wire):
    # As the images delete arrives, the _id the read found holds another
    # model's document (on a sharded cluster an _id is unique per shard
    # only). The delete names the model too, and leaves that document.
    upload(wire.db, "chair")
    (document,) = images_of(wire.db, "chair")
    other_models = {**document, "model_id": "table"}

    def another_model_holds_the_id():
        wire.db.images.replace_one({"_id": document["_id"]}, other_models)

    wire.faults[5] = another_model_holds_the_id  # the images delete, answered before the read with it
    with serving_on(wire.async_client()) as (stub_, _, _):
        reply = delete(stub_, "chair")
    assert (reply.success, reply.deleted_images) == (True, 0)
    assert images_of(wire.db, "table") == [other_models]


def test_concurrent_deletes_of_one_model_count_each_image_once(wire):
    for _ in range(5):
        upload(wire.db, "chair")
    second = []
    # Between the first delete's read and its first delete, a second delete
    # of the same model runs from start to end.
    database = "CatalogServiceDB"
    wire.faults[2] = lambda: second.extend(delete_directly(wire.async_client()[database], ["chair"]))
    (first,) = delete_directly(wire.async_client()[database], ["chair"])
    (second,) = second
    assert first.deleted_images + second.deleted_images == 5
    assert first.deleted_files + second.deleted_files == 5
    # The first call read the model's images: it was not "nothing to delete".
    assert (first.success, first.outcome, first.deleted_images) == (True, pb2.OUTCOME_DELETED, 0)
    assert "5 removed by a concurrent delete first" in first.message
    assert everything(wire.db) == {"images": [], "fs.files": [], "fs.chunks": []}


def test_an_unreachable_database_is_reported_as_unavailable_within_mongo_timeout():
    config = service_settings.load_config({"MONGO_USER": "svc", "MONGO_PASSWORD": "s3cret@pw-0123456789",
                                 "MONGO_HOST": "127.0.0.1",
                                 "MONGO_PORT": str(closed_port()), "MONGO_TIMEOUT_MS": "300"})
    with serving_on(store.connect_to_mongo(config), mongo_timeout_s=0.3) as (stub_, _, _):
        started = time.monotonic()
        reply = delete(stub_, "chair")
        elapsed = time.monotonic() - started
    assert (reply.success, reply.outcome) == (False, pb2.OUTCOME_UNAVAILABLE)
    assert reply.message == "database unavailable or too slow; retry later"
    assert elapsed < 5, f"took {elapsed:.1f} s: the driver's 30 s default is not bounded"


def test_a_failed_delete_is_one_short_warning_naming_the_request_the_host_and_the_reason(service_log):
    port = closed_port()
    config = service_settings.load_config({"MONGO_HOST": "127.0.0.1", "MONGO_PORT": str(port),
                                           "MONGO_TIMEOUT_MS": "300"})
    with serving_on(store.connect_to_mongo(config), mongo_timeout_s=0.3) as (stub_, _, _):
        stub_.DeleteImageByModelId(pb2.DeleteImageRequest(model_id="chair"), timeout=10,
                                   metadata=[("x-request-id", "req-7")])
    (warning,) = [r.getMessage() for r in service_log.records if "model(s) failed" in r.getMessage()]
    assert warning == ("delete of 1 model(s) failed request_id=req-7: ServerSelectionTimeoutError:"
                       f" 127.0.0.1:{port}: connection refused")


def test_a_database_error_naming_the_password_is_logged_with_it_blanked(wire, root_logging, tmp_path):
    config = service_settings.load_config({"MONGO_USER": "svc", "MONGO_PASSWORD": "s3cret@pw"})
    wire.refused["find"] = (18, "AuthenticationFailed", f"cannot use {config.mongo_uri} (password s3cret@pw)")
    with open(tmp_path / "log", "w+") as stream:
        observability.configure_logging(config, stream)  # the real formatter, as the server writes
        with serving_on(wire.async_client()) as (stub_, _, _):
            reply = delete(stub_, "chair")
        stream.seek(0)
        text = stream.read()
    assert reply.outcome == pb2.OUTCOME_INTERNAL
    assert "delete of 1 model(s) failed request_id=" in text
    assert ("OperationFailure: cannot use mongodb://svc:***@localhost:27017/?authSource=admin"
            " (password ***)") in text
    assert "s3cret" not in text


def test_a_database_error_is_reported_as_internal_and_the_server_keeps_serving(wire):
    upload(wire.db, "chair")
    wire.faults[1] = "error"
    with serving_on(wire.async_client()) as (stub_, _, _):
        failed, retried = delete(stub_, "chair"), delete(stub_, "chair")
    assert (failed.success, failed.outcome) == (False, pb2.OUTCOME_INTERNAL)
    assert "injected" not in failed.message
    assert (retried.success, retried.deleted_images) == (True, 1)


def test_a_database_that_never_answers_fails_within_mongo_timeout():
    with silent_socket() as port:
        config = service_settings.Config(mongo_uri=f"mongodb://127.0.0.1:{port}/", mongo_timeout_s=0.5)
        with serving_on(store.connect_to_mongo(config), mongo_timeout_s=0.5) as (stub_, _, _):
            started = time.monotonic()
            reply = delete(stub_, "chair")
            elapsed = time.monotonic() - started
    assert reply.outcome == pb2.OUTCOME_UNAVAILABLE
    assert elapsed < 5, f"took {elapsed:.1f} s: the driver's 30 s default is not bounded"


def test_the_callers_request_id_is_returned_and_logged(database, stub, service_log):
    reply, call = stub.DeleteImageByModelId.with_call(
        pb2.DeleteImageRequest(model_id="chair"), timeout=10, metadata=[("x-request-id", "catalog-42")])
    assert dict(call.trailing_metadata())["x-request-id"] == "catalog-42"
    record = service_log.wait_for("request_id=catalog-42")
    assert record.getMessage().startswith("DeleteImageByModelId status=OK request_id=catalog-42 peer=")


def test_without_a_request_id_one_is_made_up_and_a_hostile_one_is_cleaned_and_bounded(database, stub):
    _, plain = stub.DeleteImageByModelId.with_call(pb2.DeleteImageRequest(model_id="chair"), timeout=10)
    _, hostile = stub.DeleteImageByModelId.with_call(
        pb2.DeleteImageRequest(model_id="chair"), timeout=10,
        metadata=[("x-request-id", "evil id=1 peer=x;" + "a" * 500)])
    assert re.fullmatch(r"[0-9a-f]{32}", dict(plain.trailing_metadata())["x-request-id"])
    assert dict(hostile.trailing_metadata())["x-request-id"] == ("evilid1peerx" + "a" * 500)[:64]


def test_the_client_sends_and_prints_a_request_id(database, capsys):
    with serving(database) as (_, running, _):
        code = client_cli.main(["chair", "--address", f"127.0.0.1:{running.port}", "--request-id", "ops-7"])
    assert code == 0
    assert "request_id=ops-7" in capsys.readouterr().err


def test_a_dry_run_says_what_would_be_deleted_and_changes_nothing(database, stub):
    upload(database, "chair")
    upload(database, "chair", data=b"jpeg")
    before = everything(database)
    reply = stub.DeleteImageByModelId(pb2.DeleteImageRequest(model_id="chair", validate_only=True),
                                      timeout=10)
    assert everything(database) == before
    assert (reply.success, reply.outcome) == (True, pb2.OUTCOME_DELETED)
    assert (reply.deleted_images, reply.deleted_files, reply.file_bytes) == (2, 2, len(IMAGE) + 4)
    assert reply.message.startswith("would delete 2 images and 2 files")


def test_a_dry_run_batch_answers_per_model_and_changes_nothing(database, stub):
    upload(database, "chair")
    gone = upload(database, "table")
    database["fs.files"].delete_one({"_id": gone})
    before = everything(database)
    request = pb2.DeleteImagesRequest(model_ids=["chair", "table", "sofa"], validate_only=True)
    chair, table, sofa = stub.DeleteImagesByModelIds(request, timeout=10).results
    assert everything(database) == before
    assert [(r.deleted_images, r.deleted_files, r.file_bytes) for r in (chair, table, sofa)] == [
        (1, 1, len(IMAGE)), (1, 0, 0), (0, 0, 0)]
    assert sofa.outcome == pb2.OUTCOME_NOTHING_TO_DELETE
    assert all(r.message.startswith("would delete") for r in (chair, table, sofa))


def test_a_dry_run_sends_no_write_command(wire):
    for model_id in ("chair", "table"):
        upload(wire.db, model_id)
    with serving_on(wire.async_client()) as (stub_, _, _):
        stub_.DeleteImageByModelId(pb2.DeleteImageRequest(model_id="chair", validate_only=True), timeout=10)
        stub_.DeleteImagesByModelIds(pb2.DeleteImagesRequest(model_ids=["chair", "table"],
                                                             validate_only=True),
                                     timeout=10)
    # each: the read, the reference check, the files' lengths; no write
    assert wire.names() == ["find", "aggregate", "find"] * 2


def test_a_dry_run_naming_only_invalid_ids_sends_no_command(wire):
    with serving_on(wire.async_client()) as (stub_, _, _):
        request = pb2.DeleteImagesRequest(model_ids=["", "a\nb"], validate_only=True)
        replies = stub_.DeleteImagesByModelIds(request, timeout=10).results
    assert [reply.outcome for reply in replies] == [pb2.OUTCOME_INVALID_ARGUMENT] * 2
    assert wire.names() == []


def test_the_client_can_ask_for_a_dry_run(database, capsys):
    upload(database, "chair")
    with serving(database) as (_, running, _):
        code = client_cli.main(["chair", "--address", f"127.0.0.1:{running.port}", "--dry-run"])
    assert code == 0 and len(images_of(database, "chair")) == 1
    assert "would delete 1 image and 1 file" in capsys.readouterr().out


def test_a_batch_answers_one_result_per_id_in_request_order(database, stub):
    upload(database, "chair")
    upload(database, "table")
    upload(database, "table")
    upload(database, "lamp")

    results = delete_batch(stub, ["table", "sofa", "chair"])

    assert [r.model_id for r in results] == ["table", "sofa", "chair"]
    assert [(r.success, r.outcome, r.deleted_images, r.deleted_files) for r in results] == [
        (True, pb2.OUTCOME_DELETED, 2, 2), (True, pb2.OUTCOME_NOTHING_TO_DELETE, 0, 0),
        (True, pb2.OUTCOME_DELETED, 1, 1)]
    assert [d["model_id"] for d in database.images.find()] == ["lamp"]
    assert_store_consistent(database)


def test_an_invalid_id_in_a_batch_fails_alone(database, stub):
    upload(database, "chair")
    results = delete_batch(stub, ["", "chair", "x" * 300])
    assert [r.outcome for r in results] == [
        pb2.OUTCOME_INVALID_ARGUMENT, pb2.OUTCOME_DELETED, pb2.OUTCOME_INVALID_ARGUMENT]
    assert (results[0].message, results[2].message) == ("model_id is empty",
                                                        "model_id is longer than 256 characters")
    assert images_of(database, "chair") == []


def test_a_model_named_twice_in_a_batch_is_deleted_and_counted_once(database, stub):
    upload(database, "chair")
    upload(database, "chair")
    first, second = delete_batch(stub, ["chair", "chair"])
    assert (first.success, first.outcome, first.deleted_images, first.deleted_files) == (
        True, pb2.OUTCOME_DELETED, 2, 2)
    assert (second.success, second.outcome, second.deleted_images, second.deleted_files) == (
        True, pb2.OUTCOME_DELETED, 0, 0)
    assert second.model_id == "chair" and "named earlier in this batch" in second.message


def test_an_empty_batch_answers_no_results(database, stub):
    assert list(delete_batch(stub, [])) == []


def test_a_batch_of_1000_is_accepted_and_1001_is_invalid_argument(database, stub):
    upload(database, "model-999")
    results = delete_batch(stub, [f"model-{i}" for i in range(1000)])
    with pytest.raises(grpc.RpcError) as refused:
        delete_batch(stub, [f"model-{i}" for i in range(1001)])
    assert len(results) == 1000 and results[999].deleted_images == 1
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.value.details() == "at most 1000 model ids per call, got 1001"


def test_a_batch_shares_out_what_was_removed_when_files_were_already_gone(database, stub):
    gone = upload(database, "chair")
    upload(database, "table")
    database["fs.files"].delete_one({"_id": gone})
    chair, table = delete_batch(stub, ["chair", "table"])
    assert (chair.deleted_images, table.deleted_images) == (1, 1)
    assert chair.deleted_files + table.deleted_files == 1  # what the database removed, shared out
    shared_out = "counts shared out among the models deleted with it"
    assert all(shared_out in result.message for result in (chair, table))
    assert everything(database) == {"images": [], "fs.files": [], "fs.chunks": []}


@pytest.mark.parametrize("models", [40, 1000])
def test_a_batch_costs_six_commands_whatever_its_size(wire, models):
    for i in range(models):
        upload(wire.db, f"model-{i}", data=b"jpeg")
        upload(wire.db, f"model-{i}", data=b"jpeg")
    with serving_on(wire.async_client(), mongo_timeout_s=60) as (stub_, _, _):
        results = delete_batch(stub_, [f"model-{i}" for i in range(models)], timeout=60)
    assert {(r.deleted_images, r.deleted_files) for r in results} == {(2, 2)}
    assert wire.names() == [*ONE_ROUND, "find"]
    assert everything(wire.db) == {"images": [], "fs.files": [], "fs.chunks": []}


def test_the_client_sends_several_ids_as_one_batch(wire, capsys):
    upload(wire.db, "chair")
    upload(wire.db, "table")
    with serving_on(wire.async_client()) as (_, running, _):
        code = client_cli.main(["chair", "table", "sofa", "--address", f"127.0.0.1:{running.port}"])
    assert code == 0 and len(capsys.readouterr().out.splitlines()) == 3
    assert wire.names() == [*ONE_ROUND, "find"]


def leftovers(db, model_id):
    """Anything of the model's still stored: metadata, or files by name."""
    return images_of(db, model_id) + list(db["fs.files"].find({"filename": f"{model_id}.jpg"}))


@pytest.mark.parametrize("reads_first", [False, True], ids=["delete-answered-first", "read-answered-first"])
@pytest.mark.parametrize("fault", ["error", "drop-before", "drop-after"])
@pytest.mark.parametrize("command", [1, 2, 3, 4, 5, 6], ids=["read", "reference-check", "delete-files",
                                                             "delete-chunks", "delete-metadata", "last-read"])
def test_a_failure_at_any_command_leaves_a_state_the_next_call_completes(wire, command, fault, reads_first):
    for _ in range(3):
        upload(wire.db, "chair")
    upload(wire.db, "table")
    bystander = model_data(wire.db, "table")
    wire.faults[command] = fault
    wire.reads_first = reads_first  # the metadata delete and the last read go at once

    with serving_on(wire.async_client()) as (stub_, _, _):
        first = delete(stub_, "chair")
        assert command not in wire.faults, "the fault was not reached"
        if first.success:
            assert leftovers(wire.db, "chair") == []
        else:
            assert first.outcome in (pb2.OUTCOME_UNAVAILABLE, pb2.OUTCOME_INTERNAL)
        second = delete(stub_, "chair")

    assert second.success
    assert leftovers(wire.db, "chair") == []
    assert_store_consistent(wire.db)
    assert model_data(wire.db, "table") == bystander


def test_a_server_killed_mid_delete_leaves_a_state_the_restarted_server_completes(tmp_path, wire):
    for _ in range(3):
        upload(wire.db, "chair")
    upload(wire.db, "table")
    bystander = model_data(wire.db, "table")
    reached, killed = threading.Event(), threading.Event()
    wire.faults[3] = lambda: (reached.set(), killed.wait(20))  # hold the chunks delete
    first = ServerProcess(tmp_path, {"MONGO_URI": wire.uri})
    in_flight = first.stub.DeleteImageByModelId.future(pb2.DeleteImageRequest(model_id="chair"), timeout=20)
    assert reached.wait(10)

    first.process.kill()
    first.process.wait(timeout=10)
    killed.set()  # the database had the command: it completes without its caller
    with pytest.raises(grpc.RpcError):
        in_flight.result()
    second = ServerProcess(tmp_path, {"MONGO_URI": wire.uri})
    reply = second.stub.DeleteImageByModelId(pb2.DeleteImageRequest(model_id="chair"), timeout=10)
    assert second.stop() == 0

    assert (reply.success, reply.deleted_images) == (True, 3)
    assert "3 references to a file already gone" in reply.message
    assert leftovers(wire.db, "chair") == []
    assert_store_consistent(wire.db)
    assert model_data(wire.db, "table") == bystander


def look_alikes(model_id):
    """Ids that a sloppy match would confuse with ``model_id``."""
    return {model_id, model_id.strip(), f" {model_id}", f"{model_id} ", f"{model_id}\t", model_id.upper(),
            model_id.lower(), model_id.casefold(), f"^{model_id}$", f"{model_id}.*", f"{model_id}\u00a0",
            *QUERY_LOOK_ALIKES}


@settings(max_examples=300, deadline=None, derandomize=True)
@given(model_id=st.one_of(st.text(max_size=40), st.sampled_from(QUERY_LOOK_ALIKES),
                          st.builds(lambda oid: str(oid), st.builds(ObjectId))))
def test_only_exact_matches_are_ever_deleted(model_id):
    db = mongomock.MongoClient().db
    stored = look_alikes(model_id)
    for candidate in stored:
        upload(db, candidate, data=b"jpeg")

    (reply,) = delete_directly(db, [model_id])

    remaining = sorted(d["model_id"] for d in db.images.find())
    if reply.outcome == pb2.OUTCOME_INVALID_ARGUMENT:
        assert remaining == sorted(stored)
    else:
        assert reply.deleted_images == 1
        assert remaining == sorted(stored - {model_id})


@settings(max_examples=300, deadline=None, derandomize=True)
@given(method=st.sampled_from(["DeleteImageByModelId", "DeleteImagesByModelIds"]),
       body=st.binary(max_size=300))
def test_random_bytes_as_a_request_never_crash_the_server(fuzzed_server, method, body):
    db, stub_, channel = fuzzed_server
    raw_call = channel.unary_unary(f"/image_service.ImageService/{method}")
    try:
        raw_call(body, timeout=5)
    except grpc.RpcError as error:  # A body that is no request is refused as such.
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert delete(stub_, "no-such-model").outcome == pb2.OUTCOME_NOTHING_TO_DELETE
    assert len(images_of(db, "chair")) == 1


# ---------------------------------------------------------------------------
# Exactly what is the model's, whatever the data (issue 15)
# ---------------------------------------------------------------------------


def reference_to(file_id, spelling):
    """``file_id`` spelled as a writer other than the upload service might."""
    return {"hex": str(file_id), "objectid": file_id, "upper case": str(file_id).upper(),
            "spaces": f"  {file_id} ", "upper case and a tab": f"\t{str(file_id).upper()}\n",
            "a trailing space": f"{file_id} ", "vertical tab and form feed": f"\x0b{file_id}\x0c",
            "a newline first": f"\n{file_id}", "a carriage return first": f"\r{file_id}",
            "a form feed first": f"\x0c{file_id}",
            "upper case and a trailing newline": f"{str(file_id).upper()}\n"}[spelling]


@pytest.mark.parametrize("spelling", ["hex", "objectid", "upper case", "spaces", "upper case and a tab",
                                      "a trailing space", "vertical tab and form feed", "a newline first",
                                      "a carriage return first", "a form feed first",
                                      "upper case and a trailing newline"])
def test_a_file_another_model_still_references_is_kept_and_the_reply_says_so(database, stub, spelling):
    shared = upload(database, "chair")
    database.images.insert_one({"name": "copy.jpg", "image_id": reference_to(shared, spelling),
                                "model_id": "table"})
    table = model_data(database, "table")

    reply = delete(stub, "chair")

    assert (reply.success, reply.outcome, reply.deleted_images, reply.deleted_files) == (
        True, pb2.OUTCOME_DELETED, 1, 0)
    assert "kept 1 file still referenced by another model" in reply.message
    assert images_of(database, "chair") == []
    assert database["fs.chunks"].count_documents({"files_id": shared}) == 2
    assert model_data(database, "table") == table


def test_an_image_whose_model_id_is_an_array_is_another_models_and_keeps_its_file(database, stub):
    shared = upload(database, "chair")
    database.images.insert_one({"name": "both.jpg", "image_id": str(shared), "model_id": ["chair", "table"]})
    own = upload(database, "both")
    database.images.update_one({"image_id": str(own)}, {"$set": {"model_id": ["chair", "table"]}})

    reply = delete(stub, "chair")

    assert (reply.deleted_images, reply.deleted_files) == (1, 0)
    assert sorted(d["image_id"] for d in database.images.find()) == sorted([str(shared), str(own)])
    assert database["fs.files"].count_documents({}) == 2


def test_the_last_model_to_reference_a_shared_file_deletes_it(database, stub):
    shared = upload(database, "chair")
    database.images.insert_one({"name": "copy.jpg", "image_id": str(shared), "model_id": "table"})
    delete(stub, "chair")

    reply = delete(stub, "table")

    assert (reply.deleted_images, reply.deleted_files) == (1, 1)
    assert everything(database) == {"images": [], "fs.files": [], "fs.chunks": []}


def test_a_dry_run_says_which_files_it_would_keep(database, stub):
    shared = upload(database, "chair")
    database.images.insert_one({"name": "copy.jpg", "image_id": str(shared), "model_id": "table"})
    before = everything(database)

    reply = stub.DeleteImageByModelId(pb2.DeleteImageRequest(model_id="chair", validate_only=True),
                                      timeout=10)

    assert (reply.deleted_images, reply.deleted_files, reply.file_bytes) == (1, 0, 0)
    assert "would keep 1 file referenced by another model" in reply.message
    assert everything(database) == before


@pytest.mark.parametrize("upper_case", [False, True], ids=["lower case", "upper case"])
def test_a_file_stored_under_its_hex_string_id_is_deleted_with_its_chunks(database, stub, upper_case):
    store_under_hex_string_id(database, "chair", upper_case)
    upload(database, "table")
    table = model_data(database, "table")

    reply = delete(stub, "chair")

    assert (reply.success, reply.deleted_images, reply.deleted_files) == (True, 1, 1)
    assert "already gone" not in reply.message
    assert database["fs.files"].count_documents({"filename": "chair.jpg"}) == 0
    assert database["fs.chunks"].count_documents({"data": b"jpeg"}) == 0
    assert model_data(database, "table") == table


@pytest.mark.parametrize("upper_case", [False, True], ids=["lower case", "upper case"])
def test_a_dry_run_finds_a_file_stored_under_its_hex_string_id(database, stub, upper_case):
    store_under_hex_string_id(database, "chair", upper_case)

    reply = stub.DeleteImageByModelId(pb2.DeleteImageRequest(model_id="chair", validate_only=True),
                                      timeout=10)

    assert (reply.deleted_images, reply.deleted_files, reply.file_bytes) == (1, 1, 4)


def test_a_dry_run_counts_the_bytes_of_a_file_stored_under_both_spellings_of_its_id(database, stub):
    file_id = upload(database, "chair")
    store_again_under_its_hex_string(database, file_id)

    reply = stub.DeleteImageByModelId(pb2.DeleteImageRequest(model_id="chair", validate_only=True),
                                      timeout=10)

    assert (reply.deleted_images, reply.file_bytes) == (1, len(IMAGE) + 4)


def test_a_file_two_models_of_a_batch_share_is_counted_once_and_never_called_gone(database, stub):
    shared = upload(database, "chair")
    database.images.insert_one({"name": "copy.jpg", "image_id": str(shared), "model_id": "table"})

    chair, table = delete_batch(stub, ["chair", "table"])

    assert (chair.deleted_images, chair.deleted_files) == (1, 1)
    assert (table.deleted_images, table.deleted_files) == (1, 0)
    assert "1 file shared with a model deleted with it, counted there" in table.message
    assert "gone" not in chair.message + table.message
    assert everything(database) == {"images": [], "fs.files": [], "fs.chunks": []}


def test_a_dry_run_batch_counts_a_shared_file_with_the_first_model_naming_it(database, stub):
    shared = upload(database, "chair")
    database.images.insert_one({"name": "copy.jpg", "image_id": str(shared), "model_id": "table"})

    request = pb2.DeleteImagesRequest(model_ids=["chair", "table"], validate_only=True)
    chair, table = stub.DeleteImagesByModelIds(request, timeout=10).results

    assert (chair.deleted_images, chair.deleted_files, chair.file_bytes) == (1, 1, len(IMAGE))
    assert (table.deleted_images, table.deleted_files, table.file_bytes) == (1, 0, 0)


def test_a_file_a_batch_shares_with_a_model_outside_it_is_kept_by_each_and_counted_with_none(database, stub):
    shared = upload(database, "chair")
    for model_id in ("table", "sofa"):
        database.images.insert_one({"name": "copy.jpg", "image_id": str(shared), "model_id": model_id})

    chair, table = delete_batch(stub, ["chair", "table"])

    for reply in (chair, table):
        assert (reply.deleted_images, reply.deleted_files) == (1, 0)
        assert reply.message == "deleted 1 image and 0 files; kept 1 file still referenced by another model"
    assert database["fs.files"].count_documents({"_id": shared}) == 1


def test_a_model_of_a_batch_with_no_images_is_credited_with_none_of_the_files_removed(database, stub):
    file_id = upload(database, "chair")
    store_again_under_its_hex_string(database, file_id)

    chair, sofa = delete_batch(stub, ["chair", "sofa"])

    assert (chair.deleted_images, chair.deleted_files) == (1, 1)  # one file, stored twice
    assert (sofa.outcome, sofa.deleted_files) == (pb2.OUTCOME_NOTHING_TO_DELETE, 0)
    assert everything(database) == {"images": [], "fs.files": [], "fs.chunks": []}


def test_a_model_larger_than_a_round_is_deleted_in_whole_rounds(wire):
    for _ in range(5):
        upload(wire.db, "chair")
    with serving_on(wire.async_client(), round_size=2) as (stub_, _, _):
        reply = delete(stub_, "chair")
    assert (reply.success, reply.deleted_images, reply.deleted_files) == (True, 5, 5)
    assert wire.names() == [*ONE_ROUND, *ONE_ROUND, *ONE_ROUND, "find"]  # 2 + 2 + 1, and none left
    reads = [command for command in wire.commands if "model_id" in command.get("filter", {})]
    assert [read["limit"] for read in reads] == [2] * 4
    # Only the last round, not full, sends its read with its delete, leaving out what it deletes.
    assert ["_id" in read["filter"] for read in reads] == [False, False, False, True]


def test_a_call_whose_time_runs_out_between_rounds_says_how_much_it_removed_and_the_next_finishes(
        wire):
    for _ in range(5):
        upload(wire.db, "chair")
    slow = threading.Event()
    # The first round takes most of a 1 s budget: no time for a second.
    wire.faults[1] = lambda: slow.wait(0.6)
    with serving_on(wire.async_client(), mongo_timeout_s=1.0, round_size=2) as (stub_, _, _):
        first = delete(stub_, "chair")
        second = delete(stub_, "chair")
    assert (first.success, first.outcome, first.deleted_images, first.deleted_files) == (
        False, pb2.OUTCOME_INCOMPLETE, 2, 2)
    assert "more images remain" in first.message and "call again" in first.message
    assert (second.success, second.deleted_images, second.deleted_files) == (True, 3, 3)
    assert everything(wire.db) == {"images": [], "fs.files": [], "fs.chunks": []}


@pytest.mark.parametrize("command", [3, 4, 5], ids=["delete-files", "delete-chunks", "delete-metadata"])
def test_a_failure_midway_still_reports_what_was_removed_before_it(wire, command):
    for _ in range(2):
        upload(wire.db, "chair")
    wire.faults[command] = "error"
    with serving_on(wire.async_client()) as (stub_, _, _):
        failed = delete(stub_, "chair")
        retried = delete(stub_, "chair")
    removed_files = 2 if command > 3 else 0
    assert (failed.success, failed.outcome, failed.deleted_images, failed.deleted_files) == (
        False, pb2.OUTCOME_INTERNAL, 0, removed_files)
    assert (retried.success, retried.deleted_images, retried.deleted_files) == (True, 2, 2 - removed_files)
    assert everything(wire.db) == {"images": [], "fs.files": [], "fs.chunks": []}


class Mongos(WireMongo):
    """WireMongo answering as a mongos, which passes a read preference on
    to the shards: the driver then says in each command where it may read."""

    HELLO = {**WireMongo.HELLO, "msg": "isdbgrid"}


def test_reads_go_to_the_primary_whatever_the_uris_read_preference():
    stand_in = Mongos()
    try:
        upload(stand_in.db, "chair")
        uri = stand_in.uri + "&readPreference=secondaryPreferred"
        config = service_settings.load_config({"MONGO_URI": uri})
        db, _ = store.open_database(config, in_memory=False)
        with serving(db) as (stub_, _, _):
            stub_.DeleteImageByModelId(pb2.DeleteImageRequest(model_id="chair", validate_only=True),
                                       timeout=10)
            reply = delete(stub_, "chair")
    finally:
        stand_in.stop()
    assert reply.success
    reads = [command for command in stand_in.commands if "find" in command or "aggregate" in command]
    assert len(reads) == 6  # the dry run's 3, the delete's 3
    assert all(command.get("$readPreference", {"mode": "primary"})["mode"] == "primary" for command in reads)


def test_a_file_named_again_in_a_later_round_is_never_called_gone(wire):
    first = upload(wire.db, "chair")
    upload(wire.db, "chair")
    wire.db.images.insert_one({"name": "again.jpg", "image_id": str(first), "model_id": "chair"})
    with serving_on(wire.async_client(), round_size=2) as (stub_, _, _):
        reply = delete(stub_, "chair")
    assert (reply.success, reply.deleted_images, reply.deleted_files) == (True, 3, 2)
    assert reply.message == "deleted 3 images and 2 files"
    assert everything(wire.db) == {"images": [], "fs.files": [], "fs.chunks": []}


def test_a_file_shared_with_a_model_of_a_later_round_is_counted_with_the_first_and_never_called_gone(
        wire):
    shared = upload(wire.db, "chair")
    upload(wire.db, "chair")
    wire.db.images.insert_one({"name": "copy.jpg", "image_id": str(shared), "model_id": "table"})
    with serving_on(wire.async_client(), round_size=2) as (stub_, _, _):
        chair, table = delete_batch(stub_, ["chair", "table"])
    assert (chair.deleted_images, chair.deleted_files) == (2, 2)
    assert (table.deleted_images, table.deleted_files) == (1, 0)
    assert "gone" not in chair.message + table.message
    assert "1 file shared with a model deleted with it, counted there" in table.message


class ReplySizes(pymongo.monitoring.CommandListener):
    """How many documents each command's reply carried, by command name."""

    def __init__(self):
        self.documents = collections.defaultdict(list)

    def started(self, event):
        pass

    def succeeded(self, event):
        cursor = event.reply.get("cursor", {})
        self.documents[event.command_name].append(len(cursor.get("firstBatch", ())))

    def failed(self, event):
        pass


def test_a_file_shared_by_thousands_of_images_costs_the_reference_check_one_row(wire):
    shared = upload(wire.db, "chair")
    wire.db.images.insert_many([{"name": f"copy-{n}.jpg", "image_id": str(shared), "model_id": f"m{n}"}
                                for n in range(2000)])
    sizes = ReplySizes()
    with serving_on(wire.async_client(event_listeners=[sizes])) as (stub_, _, _):
        reply = delete(stub_, "chair")
    assert (reply.deleted_images, reply.deleted_files) == (1, 0)
    # The check, and the look once more at the file kept, after the image is gone.
    assert sizes.documents["aggregate"] == [1, 1]


CASE_INSENSITIVE = {"locale": "en", "strength": 2}


def reads_of(wire, collection):
    return [command for command in wire.commands
            if collection in (command.get("find"), command.get("aggregate"))]


class CommandNames(pymongo.monitoring.CommandListener):
    """The name of every command pymongo sends."""

    def __init__(self):
        self.names = []

    def started(self, event):
        self.names.append(event.command_name)

    def succeeded(self, event):
        pass

    def failed(self, event):
        pass


def delete_and_preview(wire, model_id, **client_options):
    with serving_on(wire.async_client(**client_options)) as (stub_, _, _):
        deleted = delete(stub_, model_id)
        upload(wire.db, model_id)
        preview = stub_.DeleteImageByModelId(pb2.DeleteImageRequest(model_id=model_id, validate_only=True),
                                             timeout=10)
    return deleted, preview


def test_another_models_image_id_starting_with_whitespace_keeps_no_file_of_this_call(wire):
    upload(wire.db, "chair")
    # Found by the reference check's patterns, but it names another file.
    wire.db.images.insert_one({"name": "odd.jpg", "image_id": " front.jpg", "model_id": "table"})

    (chair,) = delete_directly(wire.async_client()["CatalogServiceDB"], ["chair"])

    assert chair.message == "deleted 1 image and 1 file"
    assert wire.names() == [*ONE_ROUND, "find"]  # no second look: no file was kept


def test_reads_compare_model_ids_exactly_whatever_the_collections_collation(wire):
    wire.create_collection("images", collation=CASE_INSENSITIVE)
    upload(wire.db, "chair")
    delete_and_preview(wire, "chair")
    reads = reads_of(wire, "images")
    assert reads and all(command["collation"] == {"locale": "simple"} for command in reads)


@pytest.mark.parametrize("collection", ["images", "fs.files", "fs.chunks"])
def test_deletes_compare_ids_exactly_whatever_the_collections_collation(wire, collection):
    wire.create_collection(collection, collation=CASE_INSENSITIVE)
    upload(wire.db, "chair")
    with serving_on(wire.async_client()) as (stub_, _, _):
        delete(stub_, "chair")
    (removal,) = [command for command in wire.commands if command.get("delete") == collection]
    assert removal["deletes"][0]["collation"] == {"locale": "simple"}


def test_reads_name_no_collation_on_a_collection_whose_default_is_simple(wire):
    wire.create_collection("images", collation={"locale": "simple"})
    upload(wire.db, "chair")
    deleted, preview = delete_and_preview(wire, "chair")
    assert (deleted.success, preview.success) == (True, True)
    assert wire.commands and not any("collation" in command for command in wire.commands)


def test_reads_name_no_collation_on_a_collection_created_without_one(wire):
    upload(wire.db, "chair")
    deleted, preview = delete_and_preview(wire, "chair")
    assert (deleted.success, preview.success) == (True, True)
    assert wire.commands and not any("collation" in command for command in wire.commands)


def test_reads_name_no_collation_on_a_server_that_does_not_implement_it(wire, service_log):
    # FerretDB v1 answers NotImplemented (238) to a collation on find,
    # aggregate and delete; a collection reported with one is read without.
    wire.create_collection("images", collation=CASE_INSENSITIVE)
    wire.unimplemented = {"collation"}
    upload(wire.db, "chair")
    deleted, preview = delete_and_preview(wire, "chair")
    assert (deleted.success, preview.success) == (True, True)
    assert not any("collation" in command for command in wire.commands)
    warnings = [record.getMessage() for record in service_log.records]
    assert any("does not implement collation on reads of images" in warning for warning in warnings)


def test_reads_name_no_collation_on_a_server_that_cannot_list_collections(wire):
    wire.create_collection("images", collation=CASE_INSENSITIVE)
    wire.refused["listCollections"] = (115, "CommandNotSupported", "no such command: 'listCollections'")
    upload(wire.db, "chair")
    deleted, preview = delete_and_preview(wire, "chair")
    assert (deleted.success, preview.success) == (True, True)
    assert not any("collation" in command for command in wire.commands)


@pytest.mark.parametrize("refusal", NOT_ALLOWED_TO_LIST_COLLECTIONS.values(),
                         ids=NOT_ALLOWED_TO_LIST_COLLECTIONS.keys())
def test_reads_name_the_simple_collation_when_the_user_may_not_list_collections(wire, refusal):
    wire.refused["listCollections"] = refusal
    upload(wire.db, "chair")
    deleted, preview = delete_and_preview(wire, "chair")
    assert (deleted.success, preview.success) == (True, True)
    reads = reads_of(wire, "images")
    assert reads and all(command["collation"] == {"locale": "simple"} for command in reads)


@pytest.mark.parametrize("refusal", COLLATION_REFUSALS.values(), ids=COLLATION_REFUSALS.keys())
def test_reads_go_without_a_collation_the_server_refuses_when_the_user_may_not_list_collections(
        wire, refusal):
    # Amazon DocumentDB before 8.0 answers a read naming a collation with 303,
    # "option collation is currently not supported".
    wire.refused["listCollections"] = (13, "Unauthorized", "not authorized on CatalogServiceDB")
    wire.unimplemented, wire.unimplemented_code = {"collation"}, refusal
    upload(wire.db, "chair")
    deleted, preview = delete_and_preview(wire, "chair")
    assert (deleted.success, preview.success) == (True, True)
    assert wire.commands and not any("collation" in command for command in wire.commands)


def test_the_collation_is_decided_once(wire):
    upload(wire.db, "chair")
    upload(wire.db, "table")
    sent = CommandNames()
    with serving_on(wire.async_client(event_listeners=[sent])) as (stub_, _, _):
        delete(stub_, "chair")
        delete(stub_, "table")
    assert sent.names.count("listCollections") == 3  # once each for images, fs.files and fs.chunks


def test_the_collation_is_decided_again_while_the_images_collection_does_not_exist(wire):
    with serving_on(wire.async_client()) as (stub_, _, _):
        nothing = delete(stub_, "chair")
        wire.create_collection("images", collation=CASE_INSENSITIVE)
        upload(wire.db, "chair")
        delete(stub_, "chair")
    assert nothing.outcome == pb2.OUTCOME_NOTHING_TO_DELETE
    assert reads_of(wire, "images")[0].get("collation") is None
    assert reads_of(wire, "images")[-1]["collation"] == {"locale": "simple"}


def test_model_ids_are_compared_exactly_on_a_case_insensitive_collection(database, stub):
    try:
        database.create_collection("images", collation=CASE_INSENSITIVE)
    except NotImplementedError:
        pass  # mongomock keeps no collations: its collections compare exactly
    except pymongo.errors.OperationFailure as refused:
        # FerretDB v1 refuses a collection with a collation (NotImplemented):
        # every collection there compares exactly, and so do its reads.
        assert refused.code == 238
    upload(database, "Chair")
    upload(database, "chair")
    reply = delete(stub, "chair")
    assert (reply.success, reply.deleted_images) == (True, 1)
    assert [image["model_id"] for image in images_of(database, "Chair")] == ["Chair"]


def test_a_delete_stops_short_of_the_callers_deadline_so_its_reply_arrives(wire):
    upload(wire.db, "chair")
    with serving_on(wire.async_client(timeout_ms=30_000), mongo_timeout_s=30) as (stub_, _, _):
        wire.hang()
        reply = stub_.DeleteImageByModelId(pb2.DeleteImageRequest(model_id="chair"), timeout=1.0)
        wire.recover()
    assert (reply.success, reply.outcome) == (False, pb2.OUTCOME_UNAVAILABLE)


def mixed_case(hex_id):
    """``hex_id`` with its first letter in upper case and the others in lower."""
    first = next(number for number, character in enumerate(hex_id) if character.isalpha())
    return hex_id[:first] + hex_id[first].upper() + hex_id[first + 1:]


@pytest.mark.parametrize("spelling", ["mixed case", "a no-break space"])
def test_an_image_id_in_mixed_case_or_with_a_no_break_space_names_no_objectid_file(database, stub, spelling):
    file_id = upload(database, "chair")
    while sum(character.isalpha() for character in str(file_id)) < 2:  # too few letters to mix their case
        for collection in ("images", "fs.files", "fs.chunks"):
            database[collection].delete_many({})
        file_id = upload(database, "chair")
    odd = {"mixed case": mixed_case(str(file_id)), "a no-break space": f"{file_id}\u00a0"}[spelling]
    database.images.update_one({"model_id": "chair"}, {"$set": {"image_id": odd}})

    reply = delete(stub, "chair")

    assert (reply.success, reply.deleted_images, reply.deleted_files) == (True, 1, 0)
    # It names the file stored under exactly that spelling, and there is none.
    assert "1 reference to a file already gone" in reply.message
    assert database["fs.files"].count_documents({"_id": file_id}) == 1  # left for the sweep


def test_a_model_named_twice_in_a_failed_batch_fails_on_both_mentions(wire):
    upload(wire.db, "chair")
    wire.faults[1] = "error"
    with serving_on(wire.async_client()) as (stub_, _, _):
        first, second = delete_batch(stub_, ["chair", "chair"])
    assert (first.success, first.outcome) == (False, pb2.OUTCOME_INTERNAL)
    assert (second.success, second.outcome) == (False, pb2.OUTCOME_INTERNAL)
    assert len(images_of(wire.db, "chair")) == 1


# pymongo.timeout(0) sets no limit at all: a budget of exactly 0 s must not reach it.
@pytest.mark.parametrize("deadline", [99.0, 100.0], ids=["passed", "exactly now"])
def test_a_delete_whose_deadline_came_before_it_began_is_unavailable_and_touches_nothing(
        monkeypatch, deadline):
    db = mongomock.MongoClient().db
    upload(db, "chair")
    before = everything(db)
    monkeypatch.setattr(server, "time", types.SimpleNamespace(monotonic=lambda: 100.0))

    (reply,) = delete_before(db, ["chair"], deadline)

    assert (reply.success, reply.outcome, reply.message) == (
        False, pb2.OUTCOME_UNAVAILABLE, "database unavailable or too slow; retry later")
    assert everything(db) == before


@pytest.fixture
def round_clock(monkeypatch):
    """A clock for the deletion that stands still but for the rounds: each
    takes the next of ``clock.round_seconds``, or one second once they run
    out, and runs the next of ``clock.during_round`` after its read. The
    budget decisions, without timing."""
    clock = types.SimpleNamespace(now=0.0, round_seconds=[], during_round=[])
    clock.monotonic = lambda: clock.now
    remove_round = server.Deletion.remove_round

    async def timed_round(*args):
        if clock.during_round:
            clock.during_round.pop(0)()
        left = await remove_round(*args)
        clock.now += clock.round_seconds.pop(0) if clock.round_seconds else 1.0
        return left

    monkeypatch.setattr(server, "time", clock)
    monkeypatch.setattr(server.Deletion, "remove_round", timed_round)
    return clock


def test_another_round_starts_only_while_twice_the_slowest_round_remains(round_clock):
    db = mongomock.MongoClient().db
    for _ in range(5):
        upload(db, "chair", data=b"jpeg")

    # After the first round, 1.5 s remain: less than twice its 1 s.
    (reply,) = delete_before(db, ["chair"], 2.5, round_size=2)

    assert (reply.success, reply.outcome, reply.deleted_images) == (False, pb2.OUTCOME_INCOMPLETE, 2)
    assert len(images_of(db, "chair")) == 3


def test_a_round_that_was_not_full_is_followed_by_the_last_read_however_little_time_remains(
        round_clock):
    db = mongomock.MongoClient().db
    upload(db, "chair", data=b"jpeg")

    # After the one round, 0.5 s remain, but that round found all there was.
    (reply,) = delete_before(db, ["chair"], 1.5, round_size=2)

    assert (reply.success, reply.outcome, reply.deleted_images) == (True, pb2.OUTCOME_DELETED, 1)


def test_images_uploaded_during_a_round_that_was_not_full_are_deleted_however_little_time_remains(
        round_clock):
    db = mongomock.MongoClient().db
    upload(db, "chair", data=b"jpeg")
    round_clock.during_round = [lambda: upload(db, "chair", data=b"jpeg")]

    # After the first round, 0.5 s remain, less than twice its 1 s; but it
    # was not full: the model had few images, and the one uploaded goes too.
    (reply,) = delete_before(db, ["chair"], 1.5, round_size=2)

    assert (reply.success, reply.outcome, reply.deleted_images) == (True, pb2.OUTCOME_DELETED, 2)
    assert images_of(db, "chair") == []


def test_a_full_round_that_leaves_nothing_answers_success_however_little_time_remains(round_clock):
    db = mongomock.MongoClient().db
    for _ in range(2):
        upload(db, "chair", data=b"jpeg")

    # After the one full round, 0.5 s remain; the read sent with its last
    # delete found nothing left.
    (reply,) = delete_before(db, ["chair"], 1.5, round_size=2)

    assert (reply.success, reply.outcome, reply.deleted_images) == (True, pb2.OUTCOME_DELETED, 2)


def test_another_round_starts_when_exactly_twice_the_slowest_round_remains(round_clock):
    db = mongomock.MongoClient().db
    for _ in range(5):
        upload(db, "chair", data=b"jpeg")

    # After the first round, 2 s remain: twice its 1 s, enough for one more.
    (reply,) = delete_before(db, ["chair"], 3.0, round_size=2)

    assert (reply.success, reply.outcome, reply.deleted_images) == (False, pb2.OUTCOME_INCOMPLETE, 4)
    assert len(images_of(db, "chair")) == 1


def test_each_round_is_timed_on_its_own_not_from_the_start_of_the_call(round_clock):
    db = mongomock.MongoClient().db
    for _ in range(7):
        upload(db, "chair", data=b"jpeg")

    # Rounds of 1 s: after the second, 2.5 s remain, more than twice 1 s
    # (though less than twice the 2 s since the call began); after the
    # third, 1.5 s remain: no fourth.
    (reply,) = delete_before(db, ["chair"], 4.5, round_size=2)

    assert (reply.success, reply.outcome, reply.deleted_images) == (False, pb2.OUTCOME_INCOMPLETE, 6)
    assert len(images_of(db, "chair")) == 1


def test_the_slowest_round_so_far_not_the_last_decides_whether_another_starts(round_clock):
    db = mongomock.MongoClient().db
    for _ in range(5):
        upload(db, "chair", data=b"jpeg")
    round_clock.round_seconds = [2.0, 1.0]

    # After the second round, 3.5 s remain: more than twice the last
    # round's 1 s, less than twice the first round's 2 s.
    (reply,) = delete_before(db, ["chair"], 6.5, round_size=2)

    assert (reply.success, reply.outcome, reply.deleted_images) == (False, pb2.OUTCOME_INCOMPLETE, 4)
    assert len(images_of(db, "chair")) == 1


@pytest.mark.parametrize("case", ["lower", "upper"])
def test_a_file_another_model_references_with_a_trailing_vertical_tab_is_kept(database, stub, case):
    shared = upload(database, "chair")
    hex_id = str(shared).upper() if case == "upper" else str(shared)
    # The rule strips ASCII whitespace, vertical tab included: this names the file.
    database.images.insert_one({"name": "copy.jpg", "image_id": f"{hex_id}\x0b", "model_id": "table"})
    table = model_data(database, "table")

    reply = delete(stub, "chair")

    assert (reply.success, reply.deleted_images, reply.deleted_files) == (True, 1, 0)
    assert database["fs.files"].count_documents({"_id": shared}) == 1
    assert model_data(database, "table") == table


def test_a_file_stored_under_both_spellings_of_its_id_is_credited_to_its_own_model_in_a_batch():
    # Not on FerretDB v1: it refuses an ObjectId and its hex string as two _ids.
    database = mongomock.MongoClient().db
    file_id = upload(database, "chair")
    upload(database, "table")
    # A second writer stored chair's file again, under its hex string.
    database["fs.files"].insert_one({"_id": str(file_id), "filename": "chair.jpg", "length": 4,
                                     "chunkSize": 261120, "uploadDate": datetime.datetime.now(datetime.UTC)})

    chair, table = delete_directly(database, ["chair", "table"])

    assert (chair.deleted_images, chair.deleted_files) == (1, 1)  # one file, stored twice
    assert (table.deleted_images, table.deleted_files) == (1, 1)
    assert table.message == "deleted 1 image and 1 file"
    assert everything(database) == {"images": [], "fs.files": [], "fs.chunks": []}


def test_a_file_kept_in_several_rounds_is_counted_as_kept_once(database):
    shared = upload(database, "chair")
    database.images.insert_one({"name": "again.jpg", "image_id": str(shared), "model_id": "chair"})
    database.images.insert_one({"name": "copy.jpg", "image_id": str(shared), "model_id": "table"})

    (chair,) = delete_directly(database, ["chair"], round_size=1)

    assert (chair.success, chair.deleted_images, chair.deleted_files) == (True, 2, 0)
    assert chair.message == "deleted 2 images and 0 files; kept 1 file still referenced by another model"
