"""The README's own commands, run as written, and the client's messages.

The quick start (the in-memory server and the first delete) and the client
commands are taken from the README's text and run against a real in-memory
server, so the README cannot drift from the code. The client's environment
defaults and its TLS hint are checked against real sockets. Self-contained:
small helpers of its own, no fixtures from conftest.py.
"""

import argparse
import glob
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent import futures

import grpc
import pytest
import trustme
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

import image_service_client as client_cli
import image_service_pb2 as pb2
import image_service_pb2_grpc as pb2_grpc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
DOCUMENTED_PORT = "5014"
SCRIPTS = ("image_service_server.py", "image_service_client.py")
SETTING_PREFIXES = ("MONGO_", "GRPC_", "METRICS_", "LOG_", "SHUTDOWN_", "HEALTH_", "IMAGE_SERVICE_")
TLS_HINT = "(if the server serves TLS, pass --tls-ca)"
TLS_HANDSHAKE_HINT = "(TLS handshake failed?"


# --- the README's text


def readme_blocks():
    """Every fenced block of the README as (heading, language, lines)."""
    blocks, heading, fence, body = [], None, None, []
    with open(README, encoding="utf-8") as file:
        for line in file.read().splitlines():
            if fence is not None:
                if line.startswith("```"):
                    blocks.append((heading, fence, body))
                    fence = None
                else:
                    body.append(line)
            elif line.startswith("```"):
                fence, body = line[3:].strip(), []
            elif line.startswith("## "):
                heading = line[3:].strip()
    return blocks


def blocks_under(heading, language):
    return [lines for head, lang, lines in readme_blocks() if head == heading and lang == language]


def console_sessions(lines):
    """A ```console block as [(command, expected output lines)]."""
    sessions = []
    for line in lines:
        if line.startswith("$ "):
            sessions.append((line[2:], []))
        else:
            sessions[-1][1].append(line)
    return sessions


def as_run_here(command, port):
    """argv for a documented command: the venv's python is this one, the port is ``port``."""
    argv = []
    for word in shlex.split(command, comments=True):
        if word == ".venv/bin/python":
            word = sys.executable
        elif word in SCRIPTS:
            word = os.path.join(ROOT, word)
        argv.append(word.replace(f":{DOCUMENTED_PORT}", f":{port}"))
    return argv


def matches(expected, actual):
    """One output line against the README's: whitespace runs alike, ``...`` stands for any text."""
    pattern = ".*".join(re.escape(" ".join(part.split())) for part in expected.split("..."))
    return re.fullmatch(pattern, " ".join(actual.split())) is not None


# --- processes and ports


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until_accepting(port, process, timeout=8.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the server exited with {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise AssertionError(f"nothing accepted on port {port} within {timeout} s")


def clean_environment(**settings):
    """This environment without the service's settings (a developer's own), plus ``settings``."""
    env = {name: value for name, value in os.environ.items() if not name.startswith(SETTING_PREFIXES)}
    return {**env, "PYTHONUNBUFFERED": "1", **settings}


@pytest.fixture
def readme_server(tmp_path):
    """The README's in-memory server command, running on a free port; yields (port, its log file)."""
    (command,) = blocks_under("First delete", "bash")[0]
    port = free_port()
    log_path = tmp_path / "server.log"
    env = clean_environment(GRPC_PORT=str(port), GRPC_HOST="127.0.0.1")
    with open(log_path, "w") as log:  # the working directory has no .env of a developer's
        process = subprocess.Popen(as_run_here(command, port), cwd=tmp_path, env=env,
                                   stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until_accepting(port, process)
        yield port, log_path
    finally:
        process.terminate()
        process.wait(timeout=10)


def run_documented(command, port, tmp_path):
    return subprocess.run(as_run_here(command, port), cwd=tmp_path, env=clean_environment(),
                          capture_output=True, text=True, timeout=20)


# --- the README


def test_the_readme_quick_start_and_client_commands_run_as_written(readme_server, tmp_path):
    port, log_path = readme_server
    _, delete_block = blocks_under("First delete", "bash")
    (expected_delete,) = blocks_under("First delete", "text")
    (console,) = blocks_under("The client", "console")
    sessions = [(delete_block[0], expected_delete), *console_sessions(console)]
    assert len(sessions) >= 4, "the README documents the first delete and the client's commands"
    for command, expected in sessions:
        result = run_documented(command, port, tmp_path)
        assert result.returncode == 0, (command, result.stderr)
        actual = result.stdout.splitlines()
        assert len(actual) == len(expected), (command, actual)
        for want, got in zip(expected, actual, strict=True):
            assert matches(want, got), (command, want, got)
    log = log_path.read_text()
    first_delete = " ".join(as_run_here(delete_block[0], port)[2:])
    assert f"try: .venv/bin/python image_service_client.py {first_delete}" in log, log


def documented_command_lines():
    """(file, line) for every line of a bash or console block in the README and docs/."""
    paths = [README, *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))]
    for path in paths:
        with open(path, encoding="utf-8") as file:
            blocks = re.findall(r"^```(?:bash|console)\n(.*?)^```", file.read(), re.S | re.M)
        for block in blocks:
            for line in block.splitlines():
                yield os.path.relpath(path, ROOT), line


def test_every_documented_script_runs_with_the_venv_python():
    lines = list(documented_command_lines())
    assert any(path.startswith("docs") for path, _ in lines)
    bare = [(path, line) for path, line in lines
            if re.search(r"(?<!\.venv/bin/)\bpython3?(\.\d+)?\s+(-m\s+pytest|\S+\.py)", line)]
    assert bare == []


def test_the_readme_asks_for_python_3_11():
    with open(README, encoding="utf-8") as file:
        assert "Python 3.11 or newer" in file.read()


# --- the client's environment defaults


def test_a_bad_environment_default_does_not_break_help(monkeypatch, capsys):
    monkeypatch.setenv("IMAGE_SERVICE_ADDRESS", "no-port-here")
    monkeypatch.setenv("IMAGE_SERVICE_TIMEOUT", "soon")
    with pytest.raises(SystemExit) as exit_:
        client_cli.parse_arguments(["--help"])
    assert exit_.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--address HOST:PORT the service's address (default: $IMAGE_SERVICE_ADDRESS, else" \
           " localhost:5014)" in help_text


def test_a_bad_environment_default_does_not_break_an_option_given(monkeypatch):
    monkeypatch.setenv("IMAGE_SERVICE_ADDRESS", "no-port-here")
    monkeypatch.setenv("IMAGE_SERVICE_TIMEOUT", "soon")
    args = client_cli.parse_arguments(["chair", "--address", "127.0.0.1:7000", "--timeout", "2.5"])
    assert (args.address, args.timeout) == ("127.0.0.1:7000", 2.5)


@pytest.mark.parametrize("name, value, message", [
    ("IMAGE_SERVICE_ADDRESS", "no-port-here",
     "error: IMAGE_SERVICE_ADDRESS must be HOST:PORT (e.g. localhost:5014), got 'no-port-here'"),
    ("IMAGE_SERVICE_TIMEOUT", "soon",
     "error: IMAGE_SERVICE_TIMEOUT must be a number of seconds above 0, got 'soon'"),
])
def test_a_bad_environment_default_is_named_when_it_is_used(monkeypatch, capsys, name, value, message):
    monkeypatch.setenv(name, value)
    assert client_cli.main(["chair"]) == 2
    assert capsys.readouterr().err.splitlines() == [message]


def test_environment_defaults_apply_when_the_option_is_not_given(monkeypatch):
    monkeypatch.setenv("IMAGE_SERVICE_ADDRESS", "10.0.0.7:6000")
    monkeypatch.setenv("IMAGE_SERVICE_TIMEOUT", "4")
    args = client_cli.parse_arguments(["chair"])
    assert (args.address, args.timeout) == ("10.0.0.7:6000", 4.0)
    monkeypatch.delenv("IMAGE_SERVICE_ADDRESS")
    monkeypatch.delenv("IMAGE_SERVICE_TIMEOUT")
    args = client_cli.parse_arguments(["chair"])
    assert (args.address, args.timeout) == ("localhost:5014", 10.0)


# --- the client's hints, against real sockets


@pytest.fixture(scope="module")
def certificates(tmp_path_factory):
    """A CA and a certificate for 127.0.0.1 and localhost it signed, and a CA that signed nothing."""
    directory = tmp_path_factory.mktemp("tls")
    ca, stranger = trustme.CA(), trustme.CA()
    issued = ca.issue_cert("localhost", "127.0.0.1")
    paths = {name: str(directory / f"{name}.pem") for name in ("ca", "stranger", "cert", "key")}
    ca.cert_pem.write_to_path(paths["ca"])
    stranger.cert_pem.write_to_path(paths["stranger"])
    issued.cert_chain_pems[0].write_to_path(paths["cert"])
    issued.private_key_pem.write_to_path(paths["key"])
    return paths


def read(path):
    with open(path, "rb") as file:
        return file.read()


def health_server(certificates=None):
    """A started gRPC server answering health, TLS when ``certificates`` is given; and its port."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    if certificates:
        credentials = grpc.ssl_server_credentials([(read(certificates["key"]), read(certificates["cert"]))])
        port = server.add_secure_port("127.0.0.1:0", credentials)
    else:
        port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


def call_failure(argv, capsys):
    """The client's exit code and its stderr line for a call that failed."""
    code = client_cli.main([*argv, "--timeout", "5"])
    return code, capsys.readouterr().err.strip()


def test_a_closed_port_gets_no_tls_hint(capsys):
    port = free_port()  # bound, then closed: nothing listens there
    code, err = call_failure(["chair", "--address", f"127.0.0.1:{port}"], capsys)
    assert code == 3
    assert "Connection refused" in err
    assert TLS_HINT not in err and TLS_HANDSHAKE_HINT not in err
    assert err.endswith(f"(nothing listens at 127.0.0.1:{port}: is the server running there?)")


def test_a_closed_port_gets_no_tls_hint_with_tls_either(certificates, capsys):
    port = free_port()
    code, err = call_failure(["health", "--address", f"localhost:{port}", "--tls-ca", certificates["ca"]],
                             capsys)
    assert code == 3
    assert TLS_HANDSHAKE_HINT not in err


def test_plaintext_to_a_tls_server_gets_the_tls_hint(certificates, capsys):
    server, port = health_server(certificates)
    try:
        code, err = call_failure(["health", "--address", f"127.0.0.1:{port}"], capsys)
    finally:
        server.stop(None)
    assert code == 3
    assert err.startswith("call failed: UNAVAILABLE:") and err.endswith(TLS_HINT)


@pytest.mark.parametrize("served_with_tls, ca", [(False, "ca"), (True, "stranger")])
def test_a_failed_tls_handshake_gets_the_handshake_hint(certificates, capsys, served_with_tls, ca):
    server, port = health_server(certificates if served_with_tls else None)
    try:
        code, err = call_failure(["health", "--address", f"localhost:{port}", "--tls-ca", certificates[ca]],
                                 capsys)
    finally:
        server.stop(None)
    assert code == 3
    assert "handshake" in err.lower() and TLS_HANDSHAKE_HINT in err


class Hanging(pb2_grpc.ImageServiceServicer):
    """Holds every delete until the server stops."""

    def __init__(self):
        self.entered = threading.Event()
        self.release = threading.Event()

    def DeleteImageByModelId(self, request, context):
        self.entered.set()
        self.release.wait(10)
        return pb2.DeleteImageResponse(success=True)


def test_a_server_shutting_down_gets_no_tls_hint(capsys):
    servicer = Hanging()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb2_grpc.add_ImageServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    result = {}
    caller = threading.Thread(target=lambda: result.update(
        code=client_cli.main(["chair", "--address", f"127.0.0.1:{port}", "--timeout", "8"])))
    caller.start()
    try:
        assert servicer.entered.wait(5)
        server.stop(0.2).wait(5)  # the call in flight is cancelled as the server stops
    finally:
        servicer.release.set()
        caller.join(10)
    request_id, err = capsys.readouterr().err.strip().splitlines()
    assert result["code"] == 3
    assert request_id.startswith("request_id=")
    assert err.startswith("call failed: UNAVAILABLE:")
    assert TLS_HINT not in err and TLS_HANDSHAKE_HINT not in err


def test_the_tls_hint_needs_a_connection_failing_as_it_is_set_up():
    likely = client_cli.tls_mismatch_likely
    assert likely("failed to connect to all addresses; last error: UNAVAILABLE: ipv4:1.2.3.4:5: "
                  "Socket closed")
    assert likely("failed to connect to all addresses; last error: UNKNOWN: ipv4:1.2.3.4:5: "
                  "Tls handshake failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL")
    assert not likely("failed to connect to all addresses; last error: UNKNOWN: ipv4:1.2.3.4:5: "
                      "Failed to connect to remote host: Connection refused")
    assert not likely("Cancelling all calls")
    assert not likely("Socket closed")  # a connection that was up, then dropped
    assert not likely(None)


def test_a_passed_deadline_names_the_timeout():
    error = argparse.Namespace(code=lambda: grpc.StatusCode.DEADLINE_EXCEEDED,
                               details=lambda: "Deadline Exceeded")
    args = argparse.Namespace(address="127.0.0.1:5014", timeout=0.5, tls_ca=None)
    assert client_cli.explain(error, args) == \
        "call failed: DEADLINE_EXCEEDED: Deadline Exceeded (no answer within --timeout 0.5 s)"


def test_the_health_check_prints_serving(capsys):
    server, port = health_server()
    try:
        code = client_cli.main(["health", "--address", f"127.0.0.1:{port}", "--timeout", "5"])
    finally:
        server.stop(None)
    assert (code, capsys.readouterr().out) == (0, "SERVING\n")


class Refusing(pb2_grpc.ImageServiceServicer):
    """Refuses every delete as a server wanting a token does; remembers the request ids sent."""

    def __init__(self):
        self.request_ids = []

    def DeleteImageByModelId(self, request, context):
        self.request_ids.append(dict(context.invocation_metadata()).get("x-request-id"))
        context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token")


def image_service(servicer):
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb2_grpc.add_ImageServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


def test_a_passed_deadline_prints_the_request_id_the_call_was_sent_with(capsys):
    servicer = Hanging()
    server, port = image_service(servicer)
    try:
        code = client_cli.main(["chair", "--address", f"127.0.0.1:{port}", "--timeout", "0.5"])
    finally:
        servicer.release.set()
        server.stop(None)
    request_id, failure = capsys.readouterr().err.strip().splitlines()
    assert code == 3
    assert re.fullmatch(r"request_id=[0-9a-f]{32}", request_id)
    assert failure == "call failed: DEADLINE_EXCEEDED: Deadline Exceeded (no answer within --timeout 0.5 s)"


def test_the_request_id_printed_is_the_one_the_server_was_sent(capsys):
    servicer = Refusing()
    server, port = image_service(servicer)
    try:
        client_cli.main(["chair", "--address", f"127.0.0.1:{port}", "--timeout", "5"])
    finally:
        server.stop(None)
    request_id = capsys.readouterr().err.splitlines()[0]
    assert servicer.request_ids == [request_id.removeprefix("request_id=")]


@pytest.mark.parametrize("token, hint", [
    (None, "(the server wants a token: pass --token or set IMAGE_SERVICE_TOKEN)"),
    ("wrong-token-0123456789", "(the token given was not accepted: check --token or IMAGE_SERVICE_TOKEN)"),
], ids=["no token", "a wrong token"])
def test_unauthenticated_hints_at_the_token(capsys, token, hint):
    server, port = image_service(Refusing())
    try:
        code = client_cli.main(["chair", "--address", f"127.0.0.1:{port}", "--timeout", "5",
                                *(["--token", token] if token else [])])
    finally:
        server.stop(None)
    failure = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 3
    assert failure == f"call failed: UNAUTHENTICATED: missing or invalid bearer token {hint}"
    assert token is None or token not in failure


def test_a_tls_client_against_a_plaintext_server_prints_its_one_line_and_no_grpc_core_line(certificates):
    server, port = health_server()
    try:
        argv = [sys.executable, os.path.join(ROOT, "image_service_client.py"), "health",
                "--address", f"localhost:{port}", "--tls-ca", certificates["ca"], "--timeout", "5"]
        done = subprocess.run(argv, env=clean_environment(), capture_output=True, text=True, timeout=20)
    finally:
        server.stop(None)
    assert done.returncode == 3
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("call failed: UNAVAILABLE:") and TLS_HANDSHAKE_HINT in line


class WatchedHealth(health.HealthServicer):
    """The standard health service, telling when a Watch has begun."""

    def __init__(self):
        super().__init__()
        self.watched = threading.Event()

    def Watch(self, request, context, send_response_callback=None):
        self.watched.set()
        return super().Watch(request, context, send_response_callback)


def test_wait_for_ready_waits_for_the_server_to_come_up_and_answer_serving(capsys):
    port = free_port()
    result = {}
    caller = threading.Thread(target=lambda: result.update(code=client_cli.main(
        ["health", "--address", f"127.0.0.1:{port}", "--timeout", "10", "--wait-for-ready"])))
    caller.start()  # nothing listens yet
    servicer = WatchedHealth()
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    try:
        assert servicer.watched.wait(10)
        servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        caller.join(10)
    finally:
        server.stop(None)
    assert (result["code"], capsys.readouterr().out) == (0, "SERVING\n")


def test_wait_for_ready_gives_up_at_the_timeout_with_the_last_status(capsys):
    servicer = WatchedHealth()
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        code = client_cli.main(["health", "--address", f"127.0.0.1:{port}", "--timeout", "0.5",
                                "--wait-for-ready"])
    finally:
        server.stop(None)
    assert (code, capsys.readouterr().out) == (1, "NOT_SERVING\n")


# --- docs/operating.md's commands

OPERATING = os.path.join(ROOT, "docs", "operating.md")


def operating_blocks(heading):
    """The ```bash blocks of docs/operating.md under ``heading`` (## or ###), as text."""
    with open(OPERATING, encoding="utf-8") as file:
        section = file.read().split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^```bash\n(.*?)^```", section, re.S | re.M)


def with_this_checkout(script):
    """A documented script run here: this python and this checkout's scripts."""
    return re.sub(r"\.venv/bin/python (image_service_\w+\.py)",
                  lambda match: f"{shlex.quote(sys.executable)} {shlex.quote(os.path.join(ROOT, match[1]))}",
                  script)


def run_in_a_session_of_its_own(argv, cwd, timeout):
    """Runs ``argv``; past ``timeout``, it and everything it started are killed (a server in the
    background too), then the test fails."""
    process = subprocess.Popen(argv, cwd=cwd, env=clean_environment(), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise
    return subprocess.CompletedProcess(argv, process.returncode, stdout, stderr)


@pytest.mark.skipif(not (shutil.which("openssl") and shutil.which("curl")),
                    reason="openssl or curl is not installed: the demo makes a certificate, reads /metrics")
def test_the_operator_demo_runs_as_pasted_and_the_server_drains_on_kill(tmp_path):
    demo = operating_blocks("The whole thing on one machine: TLS, a token, metrics")[0]
    grpc_port, metrics_port = free_port(), free_port()
    demo = with_this_checkout(demo).replace(":5014", f":{grpc_port}").replace("9464", str(metrics_port))
    # As pasted, with the ports free here; then "To stop: kill %1 ..., then rm -r "$DEMO"". A
    # command that fails ends the script, and the server with it.
    demo = (f"export GRPC_PORT={grpc_port}\nset -euo pipefail\ntrap 'kill %1 2>/dev/null || true' EXIT\n"
            f"{demo}\nkill %1\nwait %1\nrm -r \"$DEMO\"\n")
    done = run_in_a_session_of_its_own(["bash", "-c", demo], tmp_path, timeout=60)
    assert done.returncode == 0, done.stderr
    out = done.stdout.splitlines()
    assert out[0] == "SERVING"
    assert out[1].startswith("sample-chair\tok\tOUTCOME_DELETED\timages=2\tfiles=2\twould delete 2 images")
    assert out[2].startswith("sample-chair\tok\tOUTCOME_DELETED\timages=2\tfiles=2\tdeleted 2 images")
    assert out[3].startswith("sample-table\tok") and out[4].startswith("sample-lamp\tok")
    assert "image_service_deletions_total{outcome=\"OUTCOME_DELETED\"} 3.0" in out
    assert "request_id=demo-1" in done.stderr
    assert "UNAVAILABLE" not in done.stderr


def test_the_systemd_sections_tool_commands_read_the_units_environment_file(tmp_path):
    (commands,) = [block for block in operating_blocks("On a VM, with systemd") if "--env-file" in block]
    unit_file = tmp_path / "env"
    with open(os.path.join(ROOT, ".env.example"), encoding="utf-8") as example:
        settings = example.read()
    # Written as the docs say systemd and .env both read: single-quoted where it holds $, # or spaces.
    settings = settings.replace("MONGO_DB=\n", "MONGO_DB=FromUnitFile\n")
    settings = settings.replace("MONGO_USER=\n", "MONGO_USER=catalog\n")
    settings = settings.replace("MONGO_PASSWORD=\n", "MONGO_PASSWORD='pa ss#wo${rd}-0123456789'\n")
    unit_file.write_text(settings)
    unit_file.chmod(0o600)
    outputs = []
    for line in commands.splitlines():
        if line.startswith("cd "):
            continue
        argv = shlex.split(with_this_checkout(line.removeprefix("sudo ")))
        argv = [str(unit_file) if word == "/etc/image-service/env" else word for word in argv]
        done = subprocess.run([*argv, "--in-memory"], cwd=tmp_path, env=clean_environment(),
                              capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, (line, done.stderr)
        outputs.append(done.stdout)
    create_indexes, sweep = outputs
    assert create_indexes.startswith("indexes present on in-memory stand-in/FromUnitFile: ")
    assert "report only: nothing changed" in sweep


class TraceReceiver:
    """An OTLP/gRPC trace receiver on loopback, for the documented tracing command."""

    def __init__(self):
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

        self.spans = []
        self.arrived = threading.Event()
        receiver = self

        class TraceService(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request, context):
                receiver.spans += [span for resource in request.resource_spans
                                   for scope in resource.scope_spans for span in scope.spans]
                receiver.arrived.set()
                return trace_service_pb2.ExportTraceServiceResponse()

        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(TraceService(), self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()


def test_the_documented_tracing_command_sends_a_span_per_call(tmp_path):
    (command,) = [block for block in operating_blocks("Tracing") if "OTEL_EXPORTER_OTLP_ENDPOINT" in block]
    receiver = TraceReceiver()
    grpc_port = free_port()
    script = with_this_checkout(command.replace("\\\n", " ")).replace(":4317", f":{receiver.port}")
    env = clean_environment(GRPC_HOST="127.0.0.1", GRPC_PORT=str(grpc_port))
    with open(tmp_path / "server.log", "w") as log:
        process = subprocess.Popen(["bash", "-c", script], cwd=tmp_path, env=env, stdout=log,
                                   stderr=subprocess.STDOUT)
    try:
        wait_until_accepting(grpc_port, process)
        code = client_cli.main(["sample-chair", "--address", f"127.0.0.1:{grpc_port}", "--timeout", "10"])
    finally:
        process.terminate()
        process.wait(timeout=20)
        receiver.server.stop(None)
    assert code == 0 and process.returncode == 0
    assert receiver.arrived.is_set()
    assert [span.name for span in receiver.spans] == ["/image_service.ImageService/DeleteImageByModelId"]
