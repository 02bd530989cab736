"""Calls take turns: two turns gather calls at once, and the calls that
arrive meanwhile are deleted together in the next, each answered for its
own models (image_service_turns.py; the deletion of several calls in
image_service_server.py)."""

import asyncio
import threading
import time

import pytest

import image_service_observability as observability
import image_service_pb2 as pb2
import image_service_server as server
import image_service_turns as turns
from image_service_replies import ModelImages
from support import (
    assert_store_consistent,
    delete,
    images_of,
    served_database,
    serving,
    serving_on,
    upload,
    wait_until,
)

HOLDING = ["held-1", "held-2"]  # models without images: each of their turns is one read


def calls_in_flight(metrics):
    return metrics.registry.get_sample_value("image_service_calls_in_flight")


def held_then_waiting(wire, stub_, metrics, waiting, metadata=None):
    """Two calls hold both turns at a hung MongoDB; the requests of
    ``waiting`` arrive behind them; then MongoDB answers. Returns the
    waiting calls' replies, in order. The holding calls' models have no
    images, so the database's first two commands are theirs."""
    wire.hang()
    holding = [stub_.DeleteImageByModelId.future(request, timeout=30) for request in requests_for(*HOLDING)]
    for _ in holding:
        assert wire.arrivals.acquire(timeout=10)
    calls = [stub_.DeleteImageByModelId.future(request, timeout=30, metadata=metadata and metadata[i])
             for i, request in enumerate(waiting)]
    wait_until(lambda: calls_in_flight(metrics) == len(holding) + len(calls))
    wire.recover()
    for call in holding:
        assert call.result().outcome == pb2.OUTCOME_NOTHING_TO_DELETE
    return [call.result() for call in calls]


def requests_for(*model_ids, dry_run=False):
    return [pb2.DeleteImageRequest(model_id=model_id, validate_only=dry_run) for model_id in model_ids]


@pytest.fixture
def served(wire):
    metrics = observability.Metrics()
    with serving_on(wire.async_client(timeout_ms=30_000), metrics, mongo_timeout_s=30) as (stub_, _, _):
        yield stub_, metrics


def test_calls_waiting_for_a_turn_are_deleted_together_in_one_set_of_commands(wire, served):
    for model_id in ("c", "d", "e", "f"):
        upload(wire.db, model_id)
    replies = held_then_waiting(wire, *served, requests_for("c", "d", "e", "f"))
    assert [(r.model_id, r.success, r.deleted_images, r.deleted_files) for r in replies] == [
        ("c", True, 1, 1), ("d", True, 1, 1), ("e", True, 1, 1), ("f", True, 1, 1)]
    # The holding turns read once each; the four waiting calls share one
    # turn: a read, the reference check, 3 deletes, the read finding none left.
    assert wire.names() == ["find", "find", "find", "aggregate", "delete", "delete", "delete", "find"], [
        (c.get("filter"), c.get("deletes")) for c in wire.commands]
    assert_store_consistent(wire.db)


def test_each_call_deleted_together_with_others_is_answered_for_its_own_models(wire, served):
    for model_id, images in (("one", 1), ("three", 3)):
        for _ in range(images):
            upload(wire.db, model_id)
    replies = held_then_waiting(wire, *served, requests_for("three", "none", "one"))
    assert [(reply.outcome, reply.deleted_images, reply.deleted_files) for reply in replies] == [
        (pb2.OUTCOME_DELETED, 3, 3), (pb2.OUTCOME_NOTHING_TO_DELETE, 0, 0), (pb2.OUTCOME_DELETED, 1, 1)]
    assert [reply.message for reply in replies] == [
        "deleted 3 images and 3 files", "no images of model 'none'; nothing to delete",
        "deleted 1 image and 1 file"]


def test_calls_deleted_together_are_counted_in_the_metrics_once_each(wire, served):
    stub_, metrics = served
    for model_id in ("c", "d"):
        upload(wire.db, model_id)
    held_then_waiting(wire, stub_, metrics, requests_for("c", "d"))
    assert metrics.registry.get_sample_value("image_service_images_deleted_total") == 2
    assert metrics.registry.get_sample_value("image_service_files_deleted_total") == 2
    deleted = {"outcome": "OUTCOME_DELETED"}
    assert metrics.registry.get_sample_value("image_service_deletions_total", deleted) == 2


def test_a_model_two_waiting_calls_name_is_deleted_in_separate_turns_and_counted_once(wire, served):
    upload(wire.db, "chair")
    replies = held_then_waiting(wire, *served, requests_for("chair", "chair"))
    assert all(reply.success for reply in replies)
    assert sum(reply.deleted_images for reply in replies) == 1
    assert sum(reply.deleted_files for reply in replies) == 1
    assert not any("batch" in reply.message for reply in replies)
    # Never in one turn, where the second would be answered as a repeat.
    assert wire.names().count("find") >= 2 + 1 + 2


def test_a_dry_run_waiting_with_deletes_changes_nothing_of_its_model(wire, served):
    for model_id in ("chair", "table"):
        upload(wire.db, model_id)
    replies = held_then_waiting(wire, *served, requests_for("chair") + requests_for("table", dry_run=True))
    assert (replies[0].outcome, replies[0].deleted_images) == (pb2.OUTCOME_DELETED, 1)
    assert (replies[1].outcome, replies[1].deleted_images) == (pb2.OUTCOME_DELETED, 1)
    assert replies[1].message.endswith("nothing was changed")
    assert len(images_of(wire.db, "table")) == 1 and wire.db["fs.files"].count_documents({}) == 1


def test_a_file_two_models_deleted_together_share_is_deleted_and_counted_once(wire, served):
    upload(wire.db, "chair")
    shared = images_of(wire.db, "chair")[0]["image_id"]
    wire.db.images.insert_one({"name": "stool.jpg", "image_id": shared, "model_id": "stool"})
    replies = held_then_waiting(wire, *served, requests_for("chair", "stool"))
    assert [(reply.success, reply.deleted_images) for reply in replies] == [(True, 1), (True, 1)]
    assert sum(reply.deleted_files for reply in replies) == 1
    assert "1 file shared with a model deleted with it, counted there" in replies[1].message
    assert wire.db["fs.files"].count_documents({}) == 0
    assert_store_consistent(wire.db)


def test_a_failure_in_a_shared_turn_is_reported_to_every_call_in_it_and_logged_with_each_request_id(
        wire, served, service_log):
    for model_id in ("c", "d"):
        upload(wire.db, model_id)
    # The holding calls' models have no images: only the shared turn checks references.
    wire.refused["aggregate"] = (2, "BadValue", "injected failure")
    replies = held_then_waiting(wire, *served, requests_for("c", "d"),
                                metadata=[(("x-request-id", "req-c"),), (("x-request-id", "req-d"),)])
    assert [reply.outcome for reply in replies] == [pb2.OUTCOME_INTERNAL] * 2
    line = service_log.wait_for("delete of 2 model(s) failed").getMessage()
    assert "request_id=req-c,req-d" in line


def waiting_call(model_ids, deadline=10.0, dry_run=False):
    return turns.WaitingCall(server.Call(model_ids), deadline, dry_run, replies=FakeFuture())


def joins(group, waiting, now=0.0):
    models = {model_id for member in group for model_id in member.call.valid}
    return turns.may_join(group, models, waiting, now, server.MAX_BATCH_SIZE)


def test_a_waiting_call_joins_only_when_no_call_of_the_turn_loses_over_a_tenth_of_its_budget():
    first = waiting_call(["a"], deadline=10.0)
    assert not joins([first], waiting_call(["b"], deadline=8.9))
    assert joins([first], waiting_call(["b"], deadline=9.0))
    assert joins([first], waiting_call(["b"], deadline=11.1))
    assert not joins([first], waiting_call(["b"], deadline=11.2))


def test_nobody_joins_a_call_whose_deadline_has_passed():
    expired = waiting_call(["a"], deadline=10.0)
    assert not joins([expired], waiting_call(["b"], deadline=30.0), now=10.5)


def test_a_turn_holds_at_most_a_batchs_worth_of_models():
    first = waiting_call(["a"])
    batch = [f"m{i}" for i in range(server.MAX_BATCH_SIZE - 1)]
    assert joins([first], waiting_call(batch))
    assert not joins([first], waiting_call([*batch, "one-more"]))


def test_dry_runs_and_models_already_in_a_turn_wait_for_another():
    first = waiting_call(["a"])
    assert not joins([first], waiting_call(["b"], dry_run=True))
    assert not joins([waiting_call(["a"], dry_run=True)], waiting_call(["b"]))
    assert not joins([first], waiting_call(["b", "a"]))


class FakeFuture:
    """A waiting call's reply, not yet given."""

    @staticmethod
    def done():
        return False


def deleted_together(db, calls, seconds=30, **options):
    """The deletion of several calls' models in one turn, without the server."""
    deadline = time.monotonic() + seconds
    return asyncio.run(server.delete_and_describe_calls(served_database(db), calls, deadline, **options))


def test_calls_deleted_together_go_on_alone_once_a_round_is_full(wire, monkeypatch):
    monkeypatch.setattr(server, "ROUND_SIZE", 3)
    for _ in range(7):
        upload(wire.db, "big")
    upload(wire.db, "small")
    full_rounds = []
    replies = asyncio.run(deleted_on_the_wire(wire, [server.Call(["big"]), server.Call(["small"])],
                                              on_full_round=lambda: full_rounds.append(1)))
    assert [(r.success, r.deleted_images) for (r,) in replies] == [(True, 7), (True, 1)]
    assert len(full_rounds) == 2  # 3 of big's images, then 3 more: 7 is not a multiple of 3
    reads = [command["filter"]["model_id"]["$in"] for command in wire.commands if "find" in command]
    # One shared read; then small reads on its own, not behind big's rounds.
    assert reads[0] == ["big", "small"] and reads[1:].count(["small"]) == 2
    assert_store_consistent(wire.db)


async def deleted_on_the_wire(wire, calls, seconds=30, **options):
    client = wire.async_client()
    try:
        db = client["CatalogServiceDB"]
        return await server.delete_and_describe_calls(db, calls, time.monotonic() + seconds, **options)
    finally:
        await client.close()


def test_each_call_deleted_together_gets_the_replies_of_its_own_ids_in_order(database):
    for model_id in ("chair", "table", "stool"):
        upload(database, model_id)
    calls = [server.Call(["table", "", "chair", "table"]), server.Call(["stool"])]
    replies = deleted_together(database, calls)
    assert [(r.model_id, r.outcome) for r in replies[0]] == [
        ("table", pb2.OUTCOME_DELETED), ("", pb2.OUTCOME_INVALID_ARGUMENT), ("chair", pb2.OUTCOME_DELETED),
        ("table", pb2.OUTCOME_DELETED)]
    assert [(r.model_id, r.deleted_images) for r in replies[1]] == [("stool", 1)]


def test_a_turn_that_turns_out_large_lets_the_next_waiting_call_start(database, monkeypatch):
    large_may_end, large_started = threading.Event(), threading.Semaphore(0)

    async def deletion(db, calls, deadline, dry_run, on_full_round, on_answered):
        if calls[0].model_ids[0].startswith("large"):
            large_started.release()
            on_full_round()  # as after a round of ROUND_SIZE images
            await asyncio.to_thread(large_may_end.wait, 30)
        for call in calls:
            on_answered(call, [pb2.DeleteImageResponse(success=True, model_id=call.model_ids[0])])

    monkeypatch.setattr(server, "delete_and_describe_calls", deletion)
    with serving(database) as (stub_, _, _):
        large = [stub_.DeleteImageByModelId.future(request, timeout=30)
                 for request in requests_for("large-1", "large-2")]
        assert large_started.acquire(timeout=10) and large_started.acquire(timeout=10)
        try:
            small = delete(stub_, "small")  # within 10 s, though both large ones still run
        finally:
            large_may_end.set()
        assert all(call.result().success for call in large)
    assert (small.success, small.model_id) == (True, "small")


def test_a_turn_ends_by_the_earliest_deadline_of_its_calls():
    # Two calls hold both gathering turns; a and b wait, and share the next.
    deadlines = {}

    async def take_turn(group, deadline, stop_gathering):
        if group[0].call.valid[0].startswith("held"):
            await held.wait()
        deadlines[tuple(waiting.call.valid[0] for waiting in group)] = deadline
        for waiting in group:
            waiting.replies.set_result([])

    async def three_calls_behind_two():
        loop = asyncio.get_running_loop()
        line = turns.Turns(take_turn, 10, server.MAX_BATCH_SIZE)
        now = time.monotonic()
        calls = [turns.WaitingCall(server.Call([model_id]), now + seconds, False, loop.create_future())
                 for model_id, seconds in (("held-1", 20.0), ("held-2", 20.0), ("a", 10.0), ("b", 9.5))]
        for waiting in calls:
            line.wait_for_turn(waiting)
        held.set()
        await asyncio.gather(*(waiting.replies for waiting in calls))
        return calls[3].deadline

    held = asyncio.Event()
    earliest = asyncio.run(three_calls_behind_two())
    assert deadlines[("a", "b")] == earliest


def test_a_file_shared_by_calls_that_go_on_alone_after_a_full_round_is_not_left_behind(database, monkeypatch):
    monkeypatch.setattr(server, "ROUND_SIZE", 3)
    for _ in range(7):
        upload(database, "big")
    upload(database, "chair")
    shared = images_of(database, "chair")[0]["image_id"]
    database.images.insert_one({"name": "stool.jpg", "image_id": shared, "model_id": "stool"})
    calls = [server.Call(["big"]), server.Call(["chair"]), server.Call(["stool"])]
    replies = deleted_together(database, calls)
    assert [(r.success, r.deleted_images) for (r,) in replies] == [(True, 7), (True, 1), (True, 1)]
    assert sum(r.deleted_files for (r,) in replies) == 8
    assert_store_consistent(database)
    assert database["fs.files"].count_documents({}) == 0


def test_a_deletion_carried_on_from_a_full_round_reads_at_least_once(database):
    upload(database, "small")
    # The shared round was full and slow: no budget for another full round
    # is left, but the call's own read still finds what remains of it.
    spent = server.Rounds(slowest=3600.0, last_was_full=True)
    found = {"small": ModelImages()}
    finished = asyncio.run(server.delete_images_of_models(
        served_database(database), ["small"], found, time.monotonic() + 30, spent.carried_on()))
    assert (finished, found["small"].deleted_images) == (True, 1)


def test_a_call_that_goes_on_alone_after_a_full_round_is_answered_as_soon_as_it_ends(database, monkeypatch):
    monkeypatch.setattr(server, "ROUND_SIZE", 3)
    monkeypatch.setattr(server, "ALONE_AT_ONCE", 1)  # small goes on first, then big
    for _ in range(7):
        upload(database, "big")
    upload(database, "small")
    big_images_left_at_answer = {}

    def answered(call, replies):
        big_images_left_at_answer[call.model_ids[0]] = len(images_of(database, "big"))

    deleted_together(database, [server.Call(["small"]), server.Call(["big"])], on_answered=answered)
    assert big_images_left_at_answer == {"small": 4, "big": 0}


def test_calls_left_without_a_rounds_time_after_a_full_round_are_answered_incomplete(wire, monkeypatch):
    monkeypatch.setattr(server, "ROUND_SIZE", 3)
    for _ in range(7):
        upload(wire.db, "big")
    upload(wire.db, "small")
    wire.faults[1] = lambda: time.sleep(2.0)  # a slow shared read: 2 s of a 3 s budget
    calls = [server.Call(["big"]), server.Call(["small"])]
    replies = asyncio.run(deleted_on_the_wire(wire, calls, seconds=3))
    assert [(r.outcome, r.deleted_images) for (r,) in replies] == [
        (pb2.OUTCOME_INCOMPLETE, 3), (pb2.OUTCOME_INCOMPLETE, 0)]
    assert wire.names().count("find") == 1


def test_turns_the_drain_cancels_before_they_start_leave_room_for_new_ones():
    async def take_turn(group, deadline, stop_gathering):
        for waiting in group:
            waiting.replies.set_result([])

    async def cancelled_then_new():
        loop = asyncio.get_running_loop()
        line = turns.Turns(take_turn, 10, server.MAX_BATCH_SIZE)

        def waiting(model_id):
            deadline = time.monotonic() + 10
            return turns.WaitingCall(server.Call([model_id]), deadline, False, loop.create_future())

        for model_id in ("a", "b"):
            line.wait_for_turn(waiting(model_id))
        for unfinished in list(line.unfinished):  # as the drain does, before any turn has run
            unfinished.cancel()
        await asyncio.sleep(0)
        later = [waiting(model_id) for model_id in ("c", "d", "e")]
        for call in later:
            line.wait_for_turn(call)
        return await asyncio.wait_for(asyncio.gather(*(call.replies for call in later)), 5)

    assert asyncio.run(cancelled_then_new()) == [[], [], []]


def turn_taker(started, release):
    """A turn that records its calls' model ids, and holds those named
    ``held-*`` until ``release`` is set."""
    async def take_turn(group, deadline, stop_gathering):
        started.append([waiting.call.valid[0] for waiting in group])
        if group[0].call.valid[0].startswith("held"):
            await release.wait()
        for waiting in group:
            waiting.replies.set_result([])
    return take_turn


def waiting_now(model_id, dry_run=False):
    replies = asyncio.get_running_loop().create_future()
    return turns.WaitingCall(server.Call([model_id]), time.monotonic() + 10, dry_run, replies)


def test_dry_runs_hold_no_gathering_turn():
    async def two_dry_runs_then_a_delete():
        started, release = [], asyncio.Event()
        line = turns.Turns(turn_taker(started, release), 10, server.MAX_BATCH_SIZE)
        for model_id in ("held-1", "held-2"):
            line.wait_for_turn(waiting_now(model_id, dry_run=True))
        delete_call = waiting_now("chair")
        line.wait_for_turn(delete_call)
        try:
            return await asyncio.wait_for(delete_call.replies, 5)
        finally:
            release.set()

    assert asyncio.run(two_dry_runs_then_a_delete()) == []


def test_a_call_the_drain_abandoned_while_it_waited_never_takes_a_turn():
    async def abandoned_while_waiting():
        started, release = [], asyncio.Event()
        line = turns.Turns(turn_taker(started, release), 10, server.MAX_BATCH_SIZE)
        for model_id in ("held-1", "held-2"):
            line.wait_for_turn(waiting_now(model_id))
        abandoned, later = waiting_now("abandoned"), waiting_now("later")
        line.wait_for_turn(abandoned)
        abandoned.replies.cancel()
        line.wait_for_turn(later)
        release.set()
        await asyncio.wait_for(later.replies, 5)
        return started

    started = asyncio.run(abandoned_while_waiting())
    assert ["later"] in started and not any("abandoned" in group for group in started)


def test_a_failure_of_many_calls_names_a_bounded_number_of_request_ids(service_log):
    calls = [server.Call([f"m{i}"], request_id=f"req-{i}") for i in range(server.LOGGED_REQUEST_IDS + 5)]
    server.failure_reported(ConnectionError("refused"), calls)
    line = service_log.wait_for("failed request_id=").getMessage()
    assert f"req-{server.LOGGED_REQUEST_IDS - 1},...(5 more):" in line
    assert f"req-{server.LOGGED_REQUEST_IDS}," not in line


def test_a_file_shared_by_calls_going_on_alone_at_the_same_time_is_not_left_behind(wire, monkeypatch):
    monkeypatch.setattr(server, "ROUND_SIZE", 3)
    for _ in range(3):
        upload(wire.db, "big")  # the shared read: big's 3 images, a full round
    upload(wire.db, "chair")
    shared = images_of(wire.db, "chair")[0]["image_id"]
    wire.db.images.insert_one({"name": "stool.jpg", "image_id": shared, "model_id": "stool"})

    def metadata_deletes(commands):
        return sum(1 for command in commands if command.get("delete") == "images")

    def metadata_deleted_together(number):
        def hold():  # so chair's and stool's reference checks each saw the other's image
            if wire.commands[number - 1].get("delete") == "images":
                wait_until(lambda: metadata_deletes(wire.commands) == 3)
        return hold

    # Commands 1-5 are the shared round, with its metadata delete.
    wire.faults.update((number, metadata_deleted_together(number)) for number in range(6, 16))
    calls = [server.Call(["big"]), server.Call(["chair"]), server.Call(["stool"])]
    replies = asyncio.run(deleted_on_the_wire(wire, calls))
    assert [(r.success, r.deleted_images) for (r,) in replies] == [(True, 3), (True, 1), (True, 1)]
    assert wire.db["fs.files"].count_documents({}) == 0
    assert_store_consistent(wire.db)
