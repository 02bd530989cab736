"""Serving: the process and its signals, health, reflection, deadlines and
admission, the drain, TLS, mTLS and tokens, logs, the client, load."""

import json
import logging
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time

import grpc
import pymongo
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

import image_service_client as client_cli
import image_service_observability as observability
import image_service_pb2 as pb2
import image_service_pb2_grpc as pb2_grpc
import image_service_server as server
import image_service_settings as service_settings
from mongo_standins import WireMongo, closed_port
from support import (
    HERE,
    ServerProcess,
    delete,
    delete_batch,
    everything,
    run_server_process,
    serving,
    serving_on,
    upload,
    wait_until,
)

SERVING = health_pb2.HealthCheckResponse.SERVING


NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def test_start_up_logs_the_address_and_database_but_never_the_password(tmp_path):
    running = ServerProcess(tmp_path, {"MONGO_USER": "svc", "MONGO_PASSWORD": "hunter2!-0123456789",
                                       "MONGO_HOST": "127.0.0.1", "MONGO_PORT": str(closed_port())})
    assert running.stop() == 0
    log_text = running.log()
    assert f"serving image_service.ImageService on 127.0.0.1:{running.port}" in log_text
    assert "mongodb://127.0.0.1:" in log_text and "/CatalogServiceDB" in log_text
    assert "hunter2" not in log_text


def test_in_memory_mode_deletes_a_sample_image_with_no_mongodb(tmp_path):
    running = ServerProcess(tmp_path, {}, "--in-memory")
    reply = running.stub.DeleteImageByModelId(pb2.DeleteImageRequest(model_id="sample-chair"), timeout=10)
    assert running.stop() == 0
    assert (reply.success, reply.deleted_images, reply.deleted_files) == (True, 2, 2)
    assert "try: .venv/bin/python image_service_client.py sample-chair" in running.log()


def test_sigterm_lets_a_delete_in_flight_finish_then_exits_0(tmp_path, wire):
    upload(wire.db, "chair")
    reached, release = threading.Event(), threading.Event()
    wire.faults[2] = lambda: (reached.set(), release.wait(20))
    running = ServerProcess(tmp_path, {"MONGO_URI": wire.uri, "HEALTH_CHECK_INTERVAL_S": "0.1"})
    in_flight = running.stub.DeleteImageByModelId.future(pb2.DeleteImageRequest(model_id="chair"), timeout=20)
    assert reached.wait(10)

    updates = watch_health(running.channel)
    assert wait_for_status(updates, SERVING)
    running.process.send_signal(signal.SIGTERM)
    assert next(updates).status == NOT_SERVING  # shutdown has begun, the delete is still running
    updates.cancel()
    release.set()

    assert in_flight.result().deleted_images == 1
    assert running.process.wait(timeout=20) == 0
    assert everything(wire.db)["images"] == []


def test_sigint_stops_the_server_with_exit_code_0(tmp_path):
    running = ServerProcess(tmp_path, {}, "--in-memory")
    assert running.stop(signal.SIGINT) == 0


def test_the_client_prints_each_result_and_fails_if_any_failed(database, capsys):
    upload(database, "chair")
    with serving(database) as (_, running, _):
        address = f"127.0.0.1:{running.port}"
        ok_code = client_cli.main(["chair", "--address", address])
        bad_code = client_cli.main(["table", "", "--address", address])
    lines = capsys.readouterr().out.splitlines()
    assert (ok_code, bad_code) == (0, 1)
    assert lines[0].startswith("chair\tok\tOUTCOME_DELETED\timages=1\tfiles=1")
    assert lines[1].startswith("table\tok\tOUTCOME_NOTHING_TO_DELETE")
    assert lines[2].startswith("\tFAILED\tOUTCOME_INVALID_ARGUMENT")


def test_the_client_reports_a_server_it_cannot_reach(capsys):
    code = client_cli.main(["chair", "--address", f"127.0.0.1:{closed_port()}", "--timeout", "1"])
    error = capsys.readouterr().err
    assert code == 3
    request_id, failure = error.splitlines()
    assert request_id.startswith("request_id=")
    assert failure.startswith(("call failed: UNAVAILABLE", "call failed: DEADLINE_EXCEEDED"))


@pytest.mark.parametrize("argv, message", [
    (["--apply"], "--apply needs --sweep-orphans"),
    (["--apply-files"], "--apply-files needs --sweep-orphans"),
    (["--min-age-s", "60"], "--min-age-s needs --sweep-orphans"),
    (["--batch-size", "10"], "--batch-size needs --sweep-orphans"),
    (["--sweep-orphans", "--min-age-s", "-5"], "--min-age-s must be zero or more seconds"),
    (["--sweep-orphans", "--min-age-s", "nan"], "--min-age-s must be zero or more seconds"),
])
def test_the_server_refuses_options_that_make_no_sense(tmp_path, argv, message):
    done = run_server_process({}, "--in-memory", *argv, cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].endswith(f"error: {message}")


@pytest.mark.parametrize("argv", [["--timeout", "0"], ["--timeout", "-1"], ["--timeout", "abc"],
                                  ["--address", "localhost"], ["--address", "localhost:0"]])
def test_the_client_refuses_a_bad_timeout_or_an_address_without_a_port(argv, capsys):
    with pytest.raises(SystemExit) as usage:
        client_cli.main(["chair", *argv])
    assert usage.value.code == 2
    assert "must be" in capsys.readouterr().err


def test_the_client_names_a_bad_timeout_in_its_environment_in_one_line(monkeypatch, capsys):
    monkeypatch.setenv("IMAGE_SERVICE_TIMEOUT", "abc")
    assert client_cli.main(["chair"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: IMAGE_SERVICE_TIMEOUT must be a number of seconds above 0, got 'abc'"]


def test_the_client_ends_on_ctrl_c_with_its_request_id_and_one_line_and_exit_code_130():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.settimeout(20)
        client = subprocess.Popen([sys.executable, os.path.join(HERE, "image_service_client.py"), "chair",
                                   "--address", f"127.0.0.1:{listener.getsockname()[1]}", "--timeout", "60",
                                   "--request-id", "ctrl-c-1"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        connection, _ = listener.accept()  # connected, and waiting for an answer that never comes
        with connection:
            client.send_signal(signal.SIGINT)
            _, err = client.communicate(timeout=20)
    assert client.returncode == 130
    assert err.strip().splitlines() == ["request_id=ctrl-c-1", "interrupted"]


def test_the_client_says_plainly_when_tls_settings_do_not_match(database, certificates, capsys):
    with serving(database, **tls_settings(certificates)) as (_, running, _):
        code = client_cli.main(["chair", "--address", f"127.0.0.1:{running.port}", "--timeout", "5"])
    assert code == 3
    assert "(if the server serves TLS, pass --tls-ca)" in capsys.readouterr().err


def watch_health(channel, service=""):
    """The health service's stream of updates for ``service``."""
    return health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=service),
                                                     timeout=20)


def wait_for_status(updates, wanted):
    for update in updates:
        if update.status == wanted:
            return True
    return False


@pytest.mark.parametrize("service", ["", "image_service.ImageService"])
def test_health_follows_mongodb_down_and_back_up(service):
    port = closed_port()
    mongo = pymongo.AsyncMongoClient(f"mongodb://127.0.0.1:{port}/?directConnection=true",
                                serverSelectionTimeoutMS=100)
    with serving_on(mongo, mongo_timeout_s=0.2) as (_, _, channel):
        updates = watch_health(channel, service)
        assert wait_for_status(updates, NOT_SERVING)
        stand_in = WireMongo(port=port)
        try:
            assert wait_for_status(updates, SERVING)
            stand_in.hang()
            assert wait_for_status(updates, NOT_SERVING)
        finally:
            updates.cancel()
            stand_in.stop()


def test_health_names_the_host_and_the_reason_when_mongodb_does_not_answer(service_log):
    port = closed_port()
    mongo = pymongo.AsyncMongoClient(f"mongodb://127.0.0.1:{port}/?directConnection=true",
                                serverSelectionTimeoutMS=100)
    with serving_on(mongo, mongo_timeout_s=0.2):
        record = service_log.wait_for("health: NOT_SERVING")
    assert record.getMessage() == (
        f"health: NOT_SERVING, MongoDB does not answer a ping: 127.0.0.1:{port}: connection refused")


def test_health_reports_not_serving_as_soon_as_shutdown_begins(database):
    with serving(database) as (_, running, channel):
        updates = watch_health(channel, "image_service.ImageService")
        assert wait_for_status(updates, SERVING)
        stopping = threading.Thread(target=running.stop, args=(5,))
        stopping.start()
        assert next(updates).status == NOT_SERVING
        updates.cancel()
        stopping.join()


def list_services(channel, metadata=None):
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    (reply,) = stub.ServerReflectionInfo(iter([request]), timeout=5, metadata=metadata)
    return {service.name for service in reply.list_services_response.service}


def test_reflection_lists_the_services(database):
    with serving(database) as (_, _, channel):
        assert {"image_service.ImageService", "grpc.health.v1.Health"} <= list_services(channel)


def test_reflection_can_be_turned_off(database):
    with serving(database, reflection=False) as (_, _, channel):
        with pytest.raises(grpc.RpcError) as refused:
            list_services(channel)
    assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_a_client_deadline_bounds_the_database_work(wire):
    upload(wire.db, "chair")
    with serving_on(wire.async_client(timeout_ms=30_000), mongo_timeout_s=30,
                    max_concurrent_deletions=4) as (stub_, _, _):
        wire.hang()
        stuck = [stub_.DeleteImageByModelId.future(pb2.DeleteImageRequest(model_id="chair"), timeout=0.3)
                 for _ in range(30)]
        for call in stuck:  # each ends by its deadline, or just before it with a timeout of its own
            try:
                assert call.result().outcome == pb2.OUTCOME_UNAVAILABLE
            except grpc.RpcError as expired:
                assert expired.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        wire.recover()
        # With the four workers still held by the hung calls (up to 30 s
        # each), this call could not be served within its deadline.
        reply = stub_.DeleteImageByModelId(pb2.DeleteImageRequest(model_id="chair"), timeout=5)
    assert (reply.success, reply.deleted_images) == (True, 1)


def test_calls_past_the_concurrency_limit_are_shed_at_once(wire):
    with serving_on(wire.async_client(), max_concurrent_rpcs=2) as (stub_, _, _):
        wire.hang()
        held = [stub_.DeleteImageByModelId.future(pb2.DeleteImageRequest(model_id="chair"), timeout=20)
                for _ in range(2)]
        assert wire.arrivals.acquire(timeout=10) and wire.arrivals.acquire(timeout=10)
        with pytest.raises(grpc.RpcError) as shed:
            delete(stub_, "chair")
        wire.recover()
        replies = [call.result() for call in held]
    assert shed.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert all(reply.success for reply in replies)


def test_health_answers_at_once_while_mongodb_hangs_and_the_delete_bound_is_full(wire):
    metrics = observability.Metrics()
    with serving_on(wire.async_client(timeout_ms=30_000), metrics, mongo_timeout_s=30,
                    max_concurrent_deletions=3,
                    max_concurrent_rpcs=3) as (stub_, _, channel):
        wire.hang()
        held = [stub_.DeleteImageByModelId.future(pb2.DeleteImageRequest(model_id=f"m{i}"), timeout=30)
                for i in range(3)]
        for _ in range(3):  # all three at the database
            assert wire.arrivals.acquire(timeout=10)
        wait_until(lambda: metrics.registry.get_sample_value("image_service_calls_in_flight") == 3)
        with pytest.raises(grpc.RpcError) as shed:
            delete(stub_, "one-more")
        check = health_pb2_grpc.HealthStub(channel).Check
        answered_in = []
        for _ in range(20):
            started = time.monotonic()
            check(health_pb2.HealthCheckRequest(service="image_service.ImageService"), timeout=2)
            answered_in.append(time.monotonic() - started)
        wire.recover()
        outcomes = {call.result().outcome for call in held}
    assert shed.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert max(answered_in) < 0.1
    assert outcomes == {pb2.OUTCOME_NOTHING_TO_DELETE}


def test_open_reflection_streams_hold_no_thread_and_do_not_delay_deletes(database):
    upload(database, "chair")
    with serving(database, max_concurrent_deletions=2) as (stub_, _, channel):
        reflection_stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        inboxes = [queue.Queue() for _ in range(20)]
        streams = [reflection_stub.ServerReflectionInfo(iter(inbox.get, None),
                                                        timeout=30) for inbox in inboxes]
        for inbox, stream in zip(inboxes, streams, strict=False):
            inbox.put(request)
            assert next(stream).list_services_response.service  # open, and answered once
        reply = stub_.DeleteImageByModelId(pb2.DeleteImageRequest(model_id="chair"), timeout=2)
        for inbox in inboxes:
            inbox.put(None)
    assert (reply.success, reply.deleted_images) == (True, 1)


def test_a_call_past_its_deadline_is_logged_and_counted_as_deadline_exceeded(wire, service_log):
    metrics = observability.Metrics()
    with serving_on(wire.async_client(timeout_ms=30_000), metrics, mongo_timeout_s=30,
                    max_concurrent_deletions=1) as (
            stub_, _, _):
        wire.hang()
        holding = stub_.DeleteImageByModelId.future(pb2.DeleteImageRequest(model_id="first"), timeout=30)
        assert wire.arrivals.acquire(timeout=10)  # the one database thread is held
        with pytest.raises(grpc.RpcError) as expired:
            stub_.DeleteImageByModelId(pb2.DeleteImageRequest(model_id="late"), timeout=0.3)
        line = service_log.wait_for("model_id='late'").getMessage()
        holding.cancel()
        wire.recover()
    assert expired.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert line.startswith("DeleteImageByModelId status=DEADLINE_EXCEEDED request_id=")
    assert metrics.registry.get_sample_value("grpc_server_call_duration_seconds_count", {
        "grpc_method": "image_service.ImageService/DeleteImageByModelId",
        "grpc_status": "DEADLINE_EXCEEDED"}) == 1


def test_a_cancelled_call_frees_its_admission_slot_at_once(wire):
    mongo = wire.async_client(timeout_ms=30_000)
    with serving_on(mongo, mongo_timeout_s=30, max_concurrent_rpcs=1) as (stub_, running, _):
        wire.hang()
        first = stub_.DeleteImageByModelId.future(pb2.DeleteImageRequest(model_id="first"), timeout=30)
        assert wire.arrivals.acquire(timeout=10)
        first.cancel()
        # Its database thread still waits on the hung MongoDB, but its slot is free:
        running.run(running.running.admission.wait_idle(10))
        second = stub_.DeleteImageByModelId.future(pb2.DeleteImageRequest(model_id="second"), timeout=30)
        assert wire.arrivals.acquire(timeout=10)  # admitted, and at the database
        wire.recover()
        assert second.result().outcome == pb2.OUTCOME_NOTHING_TO_DELETE


def test_sigterm_with_mongodb_hung_exits_0_within_the_grace_and_names_the_abandoned_call(tmp_path, wire):
    running = ServerProcess(tmp_path, {"MONGO_URI": wire.uri, "MONGO_TIMEOUT_MS": "60000",
                                       "SHUTDOWN_GRACE_S": "1"})
    wire.hang()
    stuck = running.stub.DeleteImageByModelId.future(pb2.DeleteImageRequest(model_id="chair"), timeout=60)
    assert wire.arrivals.acquire(timeout=10)
    signalled = time.monotonic()
    running.process.send_signal(signal.SIGTERM)
    code = running.process.wait(timeout=30)
    took = time.monotonic() - signalled
    lines = running.log().strip().splitlines()
    assert code == 0 and took < 1 + 1
    assert any("abandoned at shutdown: DeleteImageByModelId" in line and "'chair'" in line for line in lines)
    assert lines[-1].endswith("stopped")
    with pytest.raises(grpc.RpcError):
        stuck.result()


def test_during_the_shutdown_delay_health_is_not_serving_and_deletes_still_succeed(tmp_path):
    running = ServerProcess(tmp_path, {"SHUTDOWN_DELAY_S": "30", "HEALTH_CHECK_INTERVAL_S": "0.1"},
                            "--in-memory")
    updates = watch_health(running.channel, "image_service.ImageService")
    assert wait_for_status(updates, SERVING)
    running.process.send_signal(signal.SIGTERM)
    assert next(updates).status == NOT_SERVING
    updates.cancel()
    reply = running.stub.DeleteImageByModelId(pb2.DeleteImageRequest(model_id="sample-chair"), timeout=5)
    assert (reply.success, reply.deleted_images) == (True, 2)
    assert running.stop() == 0  # the second signal: no waiting out the 30 s


def test_a_second_signal_during_the_drain_exits_at_once(tmp_path):
    running = ServerProcess(tmp_path, {"SHUTDOWN_DELAY_S": "30"}, "--in-memory")
    running.process.send_signal(signal.SIGTERM)
    grpc.channel_ready_future(running.channel).result(timeout=10)
    health_pb2_grpc.HealthStub(running.channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    signalled = time.monotonic()
    assert running.stop(signal.SIGINT) == 0
    assert time.monotonic() - signalled < 5
    lines = running.log().strip().splitlines()
    assert "second signal: exiting now" in running.log() and lines[-1].endswith("stopped")


def test_a_second_sigterm_during_the_drain_logs_each_abandoned_call_once_and_stopped_last(tmp_path, wire):
    running = ServerProcess(tmp_path, {"MONGO_URI": wire.uri, "MONGO_TIMEOUT_MS": "60000",
                                       "SHUTDOWN_GRACE_S": "60", "HEALTH_CHECK_INTERVAL_S": "3600"})
    updates = watch_health(running.channel)
    assert wait_for_status(updates, SERVING)  # the one ping of the hour has answered
    wire.hang()
    stuck = running.stub.DeleteImageByModelId.future(pb2.DeleteImageRequest(model_id="chair"), timeout=60)
    assert wire.arrivals.acquire(timeout=10)
    running.process.send_signal(signal.SIGTERM)
    assert next(updates).status == NOT_SERVING  # the drain has begun, the delete waits on MongoDB
    updates.cancel()
    running.process.send_signal(signal.SIGTERM)
    code = running.process.wait(timeout=20)
    log_text = running.log()
    lines = log_text.strip().splitlines()
    assert code == 0
    assert lines[-1].endswith("stopped")
    assert len([line for line in lines if "abandoned at shutdown" in line and "'chair'" in line]) == 1
    assert "Traceback" not in log_text and " ERROR " not in log_text and "status=UNKNOWN" not in log_text
    with pytest.raises(grpc.RpcError):
        stuck.result()


def tls_settings(certificates, mutual=False):
    env = {"GRPC_TLS_CERT": certificates["cert"], "GRPC_TLS_KEY": certificates["key"]}
    if mutual:
        env["GRPC_TLS_CLIENT_CA"] = certificates["ca"]
    config = service_settings.load_config(env)
    return {"tls_cert": config.tls_cert, "tls_key": config.tls_key, "tls_client_ca": config.tls_client_ca}


def tls_channel(port, certificates, with_client_cert=False):
    def read(name):
        with open(certificates[name], "rb") as file:
            return file.read()

    credentials = grpc.ssl_channel_credentials(
        read("ca"),
        private_key=read("client_key") if with_client_cert else None,
        certificate_chain=read("client_cert") if with_client_cert else None)
    return grpc.secure_channel(f"127.0.0.1:{port}", credentials)


def test_tls_serves_encrypted_calls_and_refuses_plaintext(database, certificates):
    upload(database, "chair")
    with serving(database, **tls_settings(certificates)) as (plain_stub, running, _):
        with pytest.raises(grpc.RpcError) as refused:
            delete(plain_stub, "chair")
        with tls_channel(running.port, certificates) as channel:
            reply = delete(pb2_grpc.ImageServiceStub(channel), "chair")
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert reply.deleted_images == 1


def test_mtls_requires_a_client_certificate_signed_by_the_client_ca(database, certificates):
    upload(database, "chair")
    with serving(database, **tls_settings(certificates, mutual=True)) as (_, running, _):
        with tls_channel(running.port, certificates) as channel:
            with pytest.raises(grpc.RpcError) as refused:
                delete(pb2_grpc.ImageServiceStub(channel), "chair")
        with tls_channel(running.port, certificates, with_client_cert=True) as channel:
            reply = delete(pb2_grpc.ImageServiceStub(channel), "chair")
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert reply.deleted_images == 1


@pytest.mark.parametrize("variable", ["GRPC_TLS_CERT", "GRPC_TLS_KEY", "GRPC_TLS_CLIENT_CA"])
def test_a_missing_tls_file_stops_start_up_with_one_line_and_exit_code_2(tmp_path, certificates, variable):
    env = {"GRPC_TLS_CERT": certificates["cert"], "GRPC_TLS_KEY": certificates["key"],
           variable: "/no/such.pem"}
    done = run_server_process(env, cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"configuration error: {variable}: cannot read /no/such.pem: No such file or directory"]


TOKENS = {"GRPC_AUTH_TOKEN": "old-token-1b2c3d4e5f, new-token-9f8e7d6c5b"}


def test_calls_without_a_valid_token_are_refused_and_touch_nothing(database, caplog):
    upload(database, "chair")
    before = everything(database)
    tokens = service_settings.load_config(TOKENS).auth_tokens
    with caplog.at_level(logging.DEBUG), serving(database, auth_tokens=tokens) as (stub_, _, channel):
        codes = []
        for metadata in (None, [("authorization", "Bearer wrong")], [("authorization",
                                                                      "old-token-1b2c3d4e5f")],
                         [("authorization", "Basic old-token-1b2c3d4e5f")]):
            with pytest.raises(grpc.RpcError) as refused:
                delete(stub_, "chair", metadata=metadata)
            codes.append(refused.value.code())
        with pytest.raises(grpc.RpcError) as reflection_refused:
            list_services(channel)
    assert set(codes) == {grpc.StatusCode.UNAUTHENTICATED}
    assert reflection_refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert everything(database) == before
    assert "token-" not in caplog.text


def test_every_refused_call_logs_one_line_with_method_status_and_peer_but_no_token(database, service_log):
    tokens = service_settings.load_config(TOKENS).auth_tokens
    with serving(database, auth_tokens=tokens, max_concurrent_rpcs=1) as (stub_, _, _):
        with pytest.raises(grpc.RpcError):
            delete(stub_, "chair", metadata=[("authorization", "Bearer not-the-token-0123456789")])
        unauthenticated = service_log.wait_for("status=UNAUTHENTICATED")
        good = [("authorization", "Bearer old-token-1b2c3d4e5f")]
        with pytest.raises(grpc.RpcError):
            delete_batch(stub_, ["m"] * 1001, metadata=good)
        too_many = service_log.wait_for("status=INVALID_ARGUMENT")
    for record in (unauthenticated, too_many):
        assert record.levelname == "WARNING" and "peer=ipv4:127.0.0.1:" in record.getMessage()
        assert "request_id=" in record.getMessage()
    assert unauthenticated.getMessage().startswith("DeleteImageByModelId status=UNAUTHENTICATED")
    assert too_many.getMessage().startswith("DeleteImagesByModelIds status=INVALID_ARGUMENT")
    assert "models=1001 ids='m','m','m','m','m',...(+996)" in too_many.getMessage()
    assert not any("token" in r.getMessage() for r in service_log.records)


def test_a_shed_call_logs_one_line(wire, service_log):
    mongo = wire.async_client(timeout_ms=30_000)
    with serving_on(mongo, mongo_timeout_s=30, max_concurrent_rpcs=1) as (stub_, _, _):
        wire.hang()
        held = stub_.DeleteImageByModelId.future(pb2.DeleteImageRequest(model_id="held"), timeout=30)
        assert wire.arrivals.acquire(timeout=10)
        with pytest.raises(grpc.RpcError):
            delete(stub_, "shed")
        record = service_log.wait_for("status=RESOURCE_EXHAUSTED")
        wire.recover()
        held.result()
    assert record.getMessage().startswith("DeleteImageByModelId status=RESOURCE_EXHAUSTED")
    assert "model_id='shed'" in record.getMessage() and "peer=" in record.getMessage()


def test_every_listed_token_is_accepted_so_tokens_can_be_rotated(database):
    upload(database, "chair")
    upload(database, "table")
    tokens = service_settings.load_config(TOKENS).auth_tokens
    with serving(database, auth_tokens=tokens) as (stub_, _, channel):
        old = delete(stub_, "chair", metadata=[("authorization", "Bearer old-token-1b2c3d4e5f")])
        new = delete(stub_, "table", metadata=[("authorization", "Bearer new-token-9f8e7d6c5b")])
        services = list_services(channel, metadata=[("authorization", "Bearer new-token-9f8e7d6c5b")])
    assert (old.deleted_images, new.deleted_images) == (1, 1)
    assert "image_service.ImageService" in services


def test_health_needs_no_token(database):
    with serving(database, auth_tokens=("secret-token",)) as (_, _, channel):
        updates = watch_health(channel)
        assert wait_for_status(updates, SERVING)
        updates.cancel()
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert reply.status == SERVING


def test_the_client_speaks_tls_mtls_and_tokens_and_checks_health(database, certificates, capsys):
    upload(database, "chair")
    settings_ = {**tls_settings(certificates, mutual=True), "auth_tokens": ("token-a-0123456789",)}
    with serving(database, **settings_) as (_, running, _):
        tls = ["--address", f"127.0.0.1:{running.port}", "--tls-ca", certificates["ca"],
               "--tls-cert", certificates["client_cert"], "--tls-key", certificates["client_key"]]
        running.run(running.running.monitor.check())  # the first ping has answered
        health_code = client_cli.main(["health", *tls])
        refused_code = client_cli.main(["chair", *tls])
        deleted_code = client_cli.main(["chair", *tls, "--token", "token-a-0123456789", "--timeout", "5"])
    out, err = capsys.readouterr()
    assert (health_code, refused_code, deleted_code) == (0, 3, 0)
    assert out.splitlines()[0] == "SERVING"
    assert "call failed: UNAUTHENTICATED" in err
    assert out.splitlines()[1].startswith("chair\tok\tOUTCOME_DELETED")


def test_json_logs_are_one_object_per_line(root_logging, tmp_path):
    config = service_settings.load_config({"LOG_FORMAT": "json"})
    with open(tmp_path / "log", "w+") as stream:
        observability.configure_logging(config, stream)
        server.log.info("DeleteImageByModelId model_id=%r", 'a"b')
        stream.seek(0)
        (line,) = stream.read().splitlines()
    entry = json.loads(line)
    assert (entry["level"], entry["logger"], entry["message"]) == ("INFO", "image_service",
                                                                   "DeleteImageByModelId model_id='a\"b'")


def test_log_level_debug_shows_the_services_debug_lines_but_not_the_libraries(root_logging, tmp_path):
    config = service_settings.load_config({"LOG_LEVEL": "DEBUG"})
    with open(tmp_path / "log", "w+") as stream:
        observability.configure_logging(config, stream)
        for name in ("pymongo.command", "pymongo.serverSelection", "pymongo.connection", "pymongo.topology",
                     "grpc._cython.cygrpc", "asyncio", "image_service.calls", "image_service.health"):
            logging.getLogger(name).debug("debug line of %s", name)
        stream.seek(0)
        lines = stream.read().splitlines()
    assert [line.split(" debug line of ")[1] for line in lines] == ["image_service.calls",
                                                                    "image_service.health"]


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_passwords_and_tokens_never_reach_the_log(root_logging, tmp_path, log_format):
    config = service_settings.load_config({"MONGO_USER": "svc", "MONGO_PASSWORD": 'p@ss"word-0123456789',
                                 "LOG_FORMAT": log_format,
                                 "GRPC_AUTH_TOKEN": "tok-1-0123456789ab,tok-2-0123456789ab"})
    with open(tmp_path / "log", "w+") as stream:
        observability.configure_logging(config, stream)
        try:
            raise RuntimeError(f"auth failed for {config.mongo_uri} with tok-2-0123456789ab")
        except RuntimeError:
            server.log.exception("failure: %s", 'p@ss"word-0123456789')
        stream.seek(0)
        text = stream.read()
    assert "failure" in text
    for secret in ("p@ss", "p%40ss", "tok-1-0123456789ab", "tok-2-0123456789ab"):
        assert secret not in text


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_a_short_mongodb_password_is_blanked_from_the_formatted_log(root_logging, tmp_path, log_format):
    config = service_settings.load_config({"MONGO_USER": "svc", "MONGO_PASSWORD": "Zq9!x",
                                           "LOG_FORMAT": log_format})
    with open(tmp_path / "log", "w+") as stream:
        observability.configure_logging(config, stream)
        server.log.warning("auth failed for %s with password Zq9!x", config.mongo_uri)
        stream.seek(0)
        text = stream.read()
    assert "auth failed for mongodb://svc:***@localhost:27017/?authSource=admin with password ***" in text
    assert "Zq9" not in text


def test_thousands_of_concurrent_deletes_succeed_or_are_shed_and_memory_stays_flat():
    from bench import load_image_service as load

    running, model_ids = load.start_in_memory(models=300, images=2, max_concurrent_rpcs=100)
    try:
        report = load.run_load(f"127.0.0.1:{running.port}", model_ids, calls=3000, concurrency=32,
                               max_seconds=60, warm_up_calls=1000)
    finally:
        running.stop(0)
    assert report.calls == 3000
    assert report.errors == 0, report.results
    assert report.results["OK OUTCOME_DELETED"] == 300
    assert report.rss_growth_kib < 16 * 1024, f"resident memory grew {report.rss_growth_kib} KiB"


def json_lines(text):
    return [json.loads(line) for line in text.splitlines()]


def test_a_calls_json_line_carries_its_fields_as_keys_and_the_time_in_utc(tmp_path):
    running = ServerProcess(tmp_path, {"LOG_FORMAT": "json"}, "--in-memory")
    running.stub.DeleteImageByModelId(pb2.DeleteImageRequest(model_id="sample-chair"), timeout=10,
                                      metadata=[("x-request-id", "json-1")])
    assert running.stop() == 0
    (line,) = [entry for entry in json_lines(running.log()) if entry.get("request_id") == "json-1"]
    assert {key: line[key] for key in ("method", "status", "outcome", "deleted_images", "deleted_files",
                                       "model_id", "dry_run")} == {
        "method": "DeleteImageByModelId", "status": "OK", "outcome": "OUTCOME_DELETED", "deleted_images": 2,
        "deleted_files": 2, "model_id": "sample-chair", "dry_run": False}
    assert line["duration_ms"] > 0 and line["peer"].startswith("ipv4:127.0.0.1:")
    assert line["time"].endswith("+00:00") and "T" in line["time"]
    assert line["message"].startswith("DeleteImageByModelId status=OK request_id=json-1 peer=")


def test_a_batchs_json_line_counts_its_outcomes(tmp_path):
    running = ServerProcess(tmp_path, {"LOG_FORMAT": "json"}, "--in-memory")
    running.stub.DeleteImagesByModelIds(pb2.DeleteImagesRequest(model_ids=["sample-table", "nothing-here"]),
                                        timeout=10, metadata=[("x-request-id", "json-2")])
    assert running.stop() == 0
    (line,) = [entry for entry in json_lines(running.log()) if entry.get("request_id") == "json-2"]
    assert (line["outcomes"], line["models"], line["model_ids"], line["deleted_images"]) == (
        {"OUTCOME_DELETED": 1, "OUTCOME_NOTHING_TO_DELETE": 1}, 2, ["sample-table", "nothing-here"], 1)


def test_a_refused_calls_json_line_has_its_status_and_no_outcome(tmp_path):
    running = ServerProcess(tmp_path, {"LOG_FORMAT": "json", "GRPC_AUTH_TOKEN": "token-0123456789abcdef"},
                            "--in-memory")
    with pytest.raises(grpc.RpcError):
        running.stub.DeleteImageByModelId(pb2.DeleteImageRequest(model_id="sample-chair"), timeout=10,
                                          metadata=[("x-request-id", "json-3")])
    assert running.stop() == 0
    (line,) = [entry for entry in json_lines(running.log()) if entry.get("request_id") == "json-3"]
    assert (line["level"], line["status"], "outcome" in line) == ("WARNING", "UNAUTHENTICATED", False)


def test_with_json_logs_every_start_up_and_shutdown_line_is_json(tmp_path):
    running = ServerProcess(tmp_path, {"LOG_FORMAT": "json"}, "--in-memory")
    wait_until(lambda: "try:" in running.log())
    assert running.stop() == 0
    messages = [entry["message"] for entry in json_lines(running.log())]
    assert messages[0].startswith("serving image_service.ImageService on 127.0.0.1:")
    assert messages[-1] == "stopped"


def test_with_json_logs_a_configuration_error_is_one_json_line(tmp_path):
    done = run_server_process({"LOG_FORMAT": "json", "MONGO_PORT": "abc"}, cwd=tmp_path)
    assert done.returncode == 2
    (entry,) = json_lines(done.stderr)
    assert (entry["level"], entry["message"]) == (
        "ERROR", "configuration error: MONGO_PORT must be a whole number from 1 to 65535, got 'abc'")
    assert entry["time"].endswith("+00:00")


def test_a_json_log_format_set_in_dotenv_applies_to_a_configuration_error_too(tmp_path):
    (tmp_path / ".env").write_text("LOG_FORMAT=json\nGRPC_PORT=many\n")
    (tmp_path / ".env").chmod(0o600)
    done = run_server_process({}, cwd=tmp_path)
    (entry,) = json_lines(done.stderr)
    assert entry["message"].startswith("configuration error: GRPC_PORT must be a whole number")


def test_the_server_help_says_where_settings_come_from(tmp_path):
    done = run_server_process({}, "--help", cwd=tmp_path)
    text = " ".join(done.stdout.split())
    assert "--env-file PATH" in text
    assert ("Settings come from the environment, then from a .env file in the working directory, or from"
            " the file --env-file names; the environment wins. The README's Settings table and .env.example"
            " list every one.") in text


def start_in_memory_on_port_0(tmp_path, **settings):
    """The in-memory server on GRPC_PORT=0; its process and the client command its hint gives."""
    log_path = tmp_path / "server.log"
    env = {**os.environ, "GRPC_HOST": "127.0.0.1", "GRPC_PORT": "0", **settings}
    with open(log_path, "w") as log:
        argv = [sys.executable, os.path.join(HERE, "image_service_server.py"), "--in-memory"]
        process = subprocess.Popen(argv, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=log)
    try:
        wait_until(lambda: "try: " in log_path.read_text() or process.poll() is not None)
        (hint,) = [line for line in log_path.read_text().splitlines() if "try: " in line]
    except BaseException:
        process.kill()
        raise
    return process, hint.partition("try: ")[2]


def test_with_port_0_the_in_memory_hint_names_the_port_it_listens_on(tmp_path):
    process, command = start_in_memory_on_port_0(tmp_path)
    try:
        argv = command.split()
        assert argv[:3] == [".venv/bin/python", "image_service_client.py", "sample-chair"]
        done = subprocess.run([sys.executable, os.path.join(HERE, argv[1]), *argv[2:], "--timeout", "10"],
                              capture_output=True, text=True, timeout=20)
    finally:
        process.terminate()
        process.wait(10)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("sample-chair\tok\tOUTCOME_DELETED")


def test_the_in_memory_hint_gives_the_tls_and_token_options_but_never_the_token(tmp_path, certificates):
    token = "hint-token-0123456789"
    process, command = start_in_memory_on_port_0(
        tmp_path, GRPC_TLS_CERT=certificates["cert"], GRPC_TLS_KEY=certificates["key"], GRPC_AUTH_TOKEN=token)
    process.terminate()
    process.wait(10)
    assert " --tls-ca CA.pem --token TOKEN (CA.pem: the CA that signed GRPC_TLS_CERT; TOKEN: one of" \
           " GRPC_AUTH_TOKEN)" in command
    assert token not in command
