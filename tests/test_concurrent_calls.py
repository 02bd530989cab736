"""Each call is its own deletion: its reply, outcome and counts depend only
on its own call and on the database. Concurrent callers, another replica
deleting at the same moment, and a failure in one call, each made
deterministic by running the other deleter inside a hook of the stand-in,
between two commands of the first."""

import threading

import image_service_pb2 as pb2
from support import (
    assert_store_consistent,
    delete,
    delete_directly,
    everything,
    images_of,
    model_data,
    serving_on,
    upload,
    wait_until,
)

DATABASE = "CatalogServiceDB"
# The commands of a call whose model has images and shares no file.
ONE_ROUND = ["find", "aggregate", "delete", "delete", "delete"]


def share_file(db, file_id, model_id):
    """Another model's image pointing at the same GridFS file, as a copying writer stores it."""
    db.images.insert_one({"name": f"{model_id}.jpg", "image_id": str(file_id), "model_id": model_id})


def deleted_by_another_replica(wire, model_ids, replies):
    """A hook that deletes ``model_ids`` from start to end, as a second
    replica of the service would, keeping its replies."""
    return lambda: replies.extend(delete_directly(wire.async_client()[DATABASE], model_ids))


def test_a_call_is_answered_for_its_own_model_when_another_replica_deletes_a_different_model_meanwhile(wire):
    upload(wire.db, "chair")
    upload(wire.db, "table")
    elsewhere = []
    # Between this call's read and its first delete, another replica deletes "table".
    wire.faults[2] = deleted_by_another_replica(wire, ["table"], elsewhere)

    (chair,) = delete_directly(wire.async_client()[DATABASE], ["chair"])

    assert (chair.success, chair.outcome, chair.deleted_images, chair.deleted_files) == (
        True, pb2.OUTCOME_DELETED, 1, 1)
    assert chair.message == "deleted 1 image and 1 file"
    assert [(reply.outcome, reply.deleted_images) for reply in elsewhere] == [(pb2.OUTCOME_DELETED, 1)]
    assert everything(wire.db) == {"images": [], "fs.files": [], "fs.chunks": []}


def test_a_model_this_call_read_is_never_nothing_to_delete_when_another_replica_deletes_it_first(wire):
    upload(wire.db, "chair")
    elsewhere = []
    wire.faults[2] = deleted_by_another_replica(wire, ["chair"], elsewhere)

    (chair,) = delete_directly(wire.async_client()[DATABASE], ["chair"])

    assert (chair.success, chair.outcome, chair.deleted_images) == (True, pb2.OUTCOME_DELETED, 0)
    assert "1 removed by a concurrent delete first" in chair.message
    assert "nothing to delete" not in chair.message
    assert (elsewhere[0].outcome, elsewhere[0].deleted_images) == (pb2.OUTCOME_DELETED, 1)


def test_two_callers_whose_models_share_a_file_delete_it_whoever_is_last(wire):
    shared = upload(wire.db, "chair")
    share_file(wire.db, shared, "table")
    table = []
    # Both reference checks see the other model's image: the second caller
    # runs whole just before the first deletes its images document.
    wire.faults[3] = deleted_by_another_replica(wire, ["table"], table)

    (chair,) = delete_directly(wire.async_client()[DATABASE], ["chair"])

    assert (table[0].success, table[0].deleted_images, table[0].deleted_files) == (True, 1, 0)
    assert "kept 1 file still referenced by another model" in table[0].message
    assert (chair.success, chair.deleted_images, chair.deleted_files) == (True, 1, 1)
    assert chair.message == "deleted 1 image and 1 file"
    assert everything(wire.db) == {"images": [], "fs.files": [], "fs.chunks": []}


def test_a_file_kept_for_a_model_not_being_deleted_costs_one_more_read_and_stays(wire):
    shared = upload(wire.db, "chair")
    share_file(wire.db, shared, "table")

    (chair,) = delete_directly(wire.async_client()[DATABASE], ["chair"])

    assert (chair.deleted_images, chair.deleted_files) == (1, 0)
    # A round that keeps a file reads what is left after its second look.
    assert wire.names() == ["find", "aggregate", "delete", "aggregate", "find"]
    assert wire.db["fs.files"].count_documents({"_id": shared}) == 1
    assert_store_consistent(wire.db)


def test_an_image_uploaded_during_the_second_look_is_deleted_too(wire):
    shared = upload(wire.db, "chair")
    share_file(wire.db, shared, "table")
    wire.faults[4] = lambda: upload(wire.db, "chair")  # the second look

    (chair,) = delete_directly(wire.async_client()[DATABASE], ["chair"])

    assert (chair.success, chair.deleted_images, chair.deleted_files) == (True, 2, 1)
    assert images_of(wire.db, "chair") == []
    assert_store_consistent(wire.db)


def test_a_delete_that_keeps_no_file_sends_no_second_look(wire):
    upload(wire.db, "chair")

    delete_directly(wire.async_client()[DATABASE], ["chair"])

    assert wire.names() == [*ONE_ROUND, "find"]


def test_a_failure_in_one_call_leaves_another_calls_reply_exact(wire):
    upload(wire.db, "chair")
    upload(wire.db, "table")
    table = []
    # "table" is deleted whole inside the first command of the call for
    # "chair" (its commands are 2 to 7), whose next command then fails.
    wire.faults[1] = deleted_by_another_replica(wire, ["table"], table)
    wire.faults[8] = "error"

    (chair,) = delete_directly(wire.async_client()[DATABASE], ["chair"])

    assert (chair.success, chair.outcome) == (False, pb2.OUTCOME_INTERNAL)
    assert (table[0].success, table[0].outcome, table[0].deleted_images, table[0].deleted_files) == (
        True, pb2.OUTCOME_DELETED, 1, 1)
    assert table[0].message == "deleted 1 image and 1 file"
    assert len(images_of(wire.db, "chair")) == 1


def test_a_call_past_its_deadline_leaves_a_concurrent_calls_reply_whole(wire):
    for model_id in ("chair", "table"):
        upload(wire.db, model_id)
    with serving_on(wire.async_client(timeout_ms=30_000), mongo_timeout_s=30) as (stub_, _, _):
        wire.hang()
        hung = stub_.DeleteImageByModelId.future(pb2.DeleteImageRequest(model_id="chair"), timeout=0.5)
        assert wire.arrivals.acquire(timeout=10)
        chair = hung.result()
        wire.recover()
        table = delete(stub_, "table")
    assert (chair.success, chair.outcome) == (False, pb2.OUTCOME_UNAVAILABLE)
    assert (table.success, table.outcome, table.deleted_images, table.deleted_files) == (
        True, pb2.OUTCOME_DELETED, 1, 1)
    assert table.message == "deleted 1 image and 1 file"


def test_concurrent_callers_of_overlapping_models_and_shared_files_leave_a_consistent_store(wire):
    shared = upload(wire.db, "m0")
    for number in range(1, 6):
        upload(wire.db, f"m{number}")
        share_file(wire.db, shared, f"m{number}")
    replies = {}

    def caller(model_ids):
        client = wire.async_client()
        replies[tuple(model_ids)] = delete_directly(client[DATABASE], model_ids)

    callers = [threading.Thread(target=caller, args=(models,))
               for models in (["m0", "m1"], ["m1", "m2"], ["m2", "m3"], ["m3", "m4", "m5"], ["m5"])]
    for thread in callers:
        thread.start()
    for thread in callers:
        thread.join(timeout=60)
    wait_until(lambda: len(replies) == len(callers))
    assert all(reply.success for model_replies in replies.values() for reply in model_replies)
    assert everything(wire.db) == {"images": [], "fs.files": [], "fs.chunks": []}


def test_a_bystander_is_untouched_by_concurrent_callers(wire):
    bystander_file = upload(wire.db, "bystander")
    share_file(wire.db, bystander_file, "chair")
    upload(wire.db, "chair")
    bystander = model_data(wire.db, "bystander")
    wire.faults[3] = deleted_by_another_replica(wire, ["chair"], [])

    delete_directly(wire.async_client()[DATABASE], ["chair"])

    assert model_data(wire.db, "bystander") == bystander
    assert_store_consistent(wire.db)


def test_a_failed_second_look_is_reported_and_leaves_the_kept_file_whole(wire):
    shared = upload(wire.db, "chair")
    share_file(wire.db, shared, "table")
    table = []
    wire.faults[3] = deleted_by_another_replica(wire, ["table"], table)
    # The call for "chair": find, aggregate, then (table's 5 commands run
    # before it) its images delete, and its second look, command 9.
    wire.faults[9] = "error"

    (chair,) = delete_directly(wire.async_client()[DATABASE], ["chair"])

    assert wire.names()[8] == "aggregate"
    assert (chair.success, chair.outcome, chair.deleted_images) == (False, pb2.OUTCOME_INTERNAL, 1)
    assert wire.db.images.count_documents({}) == 0
    # Referenced by nothing now: the orphan sweep's to remove.
    assert wire.db["fs.files"].count_documents({"_id": shared}) == 1
    assert wire.db["fs.chunks"].count_documents({"files_id": shared}) == 2
