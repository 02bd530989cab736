"""Settings: how the environment and .env become a Config, and how a bad
setting stops start-up with one line naming it."""

import os
import socket

import pymongo
import pytest

import image_service_settings as service_settings
from mongo_standins import closed_port
from support import HERE, run_server_process


def test_credentials_are_percent_escaped_in_the_uri():
    uri = service_settings.build_mongo_uri({"MONGO_USER": "app@team",
                                            "MONGO_PASSWORD": "p@ss:w/rd%?#-0123456789",
                                  "MONGO_HOST": "db.internal", "MONGO_PORT": "27018"})
    assert uri == "mongodb://app%40team:p%40ss%3Aw%2Frd%25%3F%23-0123456789@db.internal:27018/?authSource=admin"
    parsed = pymongo.uri_parser.parse_uri(uri)
    assert (parsed["username"], parsed["password"]) == ("app@team", "p@ss:w/rd%?#-0123456789")


def test_without_a_user_the_uri_carries_no_credentials():
    assert service_settings.build_mongo_uri({}) == "mongodb://localhost:27017/"


def test_a_password_without_a_user_is_refused():
    with pytest.raises(service_settings.ConfigError, match="MONGO_PASSWORD is set but MONGO_USER is not"):
        service_settings.build_mongo_uri({"MONGO_PASSWORD": "x"})


def test_a_user_without_a_password_is_refused_naming_the_settings_that_were_set():
    with pytest.raises(service_settings.ConfigError) as refused:
        service_settings.load_config({"MONGO_USER": "catalog"})
    assert str(refused.value) == ("MONGO_USER is set but MONGO_PASSWORD is not; set MONGO_PASSWORD too, or"
                                  " unset MONGO_USER to connect without credentials")


def test_mongo_uri_overrides_the_parts():
    env = {"MONGO_URI": "mongodb+srv://u:p-0123456789abcdef@cluster0.example.net/", "MONGO_HOST": "ignored"}
    assert service_settings.load_config(env).mongo_uri == "mongodb+srv://u:p-0123456789abcdef@cluster0.example.net/"


def test_defaults():
    config = service_settings.load_config({})
    assert (config.mongo_uri, config.mongo_db, config.mongo_timeout_s) == (
        "mongodb://localhost:27017/", "CatalogServiceDB", 5.0)
    assert (config.grpc_host, config.grpc_port) == ("0.0.0.0", 5014)
    assert (config.max_concurrent_deletions, config.max_concurrent_rpcs) == (10, 100)
    assert (config.reflection, config.auth_tokens, config.shutdown_grace_s, config.log_format) == (
        True, (), 10.0, "text")


def test_the_database_is_described_without_credentials():
    config = service_settings.load_config({"MONGO_USER": "svc", "MONGO_PASSWORD": "hunter2-0123456789",
                                           "MONGO_HOST": "db1"})
    assert service_settings.describe_database(config) == "mongodb://db1:27017/CatalogServiceDB"


BAD_SETTINGS = {
    "MONGO_PORT": "abc", "GRPC_PORT": "70000", "MONGO_TIMEOUT_MS": "0", "MAX_CONCURRENT_DELETIONS": "-1",
    "GRPC_MAX_WORKERS": "0",
    "GRPC_MAX_CONCURRENT_RPCS": "many", "GRPC_REFLECTION": "maybe", "SHUTDOWN_GRACE_S": "soon",
    "LOG_LEVEL": "LOUD", "LOG_FORMAT": "xml", "GRPC_TLS_CERT": "/no/such/cert.pem", "SHUTDOWN_DELAY_S": "-1",
}


@pytest.mark.parametrize("name, value", BAD_SETTINGS.items())
def test_a_bad_setting_is_refused_naming_the_variable(name, value):
    with pytest.raises(service_settings.ConfigError, match=name):
        service_settings.load_config({name: value})


def test_a_bad_setting_stops_start_up_with_one_line_and_exit_code_2(tmp_path):
    done = run_server_process({"MONGO_PORT": "abc"}, cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "configuration error: MONGO_PORT must be a whole number from 1 to 65535, got 'abc'"]


@pytest.mark.parametrize("uri", ["mongodb://svc:hunter2-0123456789@db:abc/",
                                 "mongodb://svc:hun@ter2-0123456789@db/", "mysql://db/"])
def test_a_bad_mongo_uri_stops_start_up_with_one_line_and_exit_code_2(tmp_path, uri):
    done = run_server_process({"MONGO_URI": uri}, cwd=tmp_path)
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("configuration error: MONGO_URI")
    assert "hunter2" not in line and "ter2" not in line


def test_a_port_already_in_use_stops_start_up_with_one_line_and_exit_code_2(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = run_server_process({"GRPC_HOST": "127.0.0.1", "GRPC_PORT": str(port)}, "--in-memory",
                                  cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"configuration error: GRPC_PORT: cannot listen on 127.0.0.1:{port}: address already in use"]


FAIL_CLOSED = {
    "an empty token list": ({"GRPC_AUTH_TOKEN": ","}, "GRPC_AUTH_TOKEN is set but holds no token"),
    "a blank token list": ({"GRPC_AUTH_TOKEN": " "}, "GRPC_AUTH_TOKEN is set but holds no token"),
    "a list of blank tokens": ({"GRPC_AUTH_TOKEN": ", ,"}, "GRPC_AUTH_TOKEN is set but holds no token"),
    "a short token": ({"GRPC_AUTH_TOKEN": "long-enough-token-123,abc"},
                      "GRPC_AUTH_TOKEN: token 2 of 2 is shorter than 16 characters"),
    "an unclosed IPv6 literal": ({"MONGO_URI": "mongodb://[::1"}, "MONGO_URI: "),
    "a URI without a scheme": ({"MONGO_URI": "localhost:27017"},
                               "MONGO_URI must start with mongodb:// or mongodb+srv://"),
    "unacknowledged writes": ({"MONGO_URI": "mongodb://db/?w=0"}, "MONGO_URI: w=0 (unacknowledged writes)"),
    "a port in MONGO_HOST": ({"MONGO_HOST": "host:27017"}, "MONGO_HOST must be a host name or an IP address"),
    "a dot in the database name": ({"MONGO_DB": "a.b"}, "MONGO_DB must be under 64 bytes"),
    "a slash in the database name": ({"MONGO_DB": "bad/name"}, "MONGO_DB must be under 64 bytes"),
    "a database name of 64 bytes": ({"MONGO_DB": "d" * 64}, "MONGO_DB must be under 64 bytes"),
}


@pytest.mark.parametrize("env, message", FAIL_CLOSED.values(), ids=FAIL_CLOSED.keys())
def test_a_setting_that_would_fail_later_or_open_is_refused_at_start_up(env, message):
    with pytest.raises(service_settings.ConfigError) as refused:
        service_settings.load_config(env)
    assert str(refused.value).startswith(message)
    assert "abc" not in str(refused.value)  # never the secret


@pytest.mark.parametrize("env", [{"MONGO_USER": "svc", "MONGO_PASSWORD": "Zq9!x"},
                                 {"MONGO_URI": "mongodb://svc:Zq9!x@db/"}],
                         ids=["MONGO_PASSWORD", "MONGO_URI"])
def test_a_mongodb_password_of_any_length_is_accepted_and_kept_secret(env):
    config = service_settings.load_config(env)  # the database administrator chose it, not this service
    assert "Zq9!x" in config.secrets


def test_a_token_of_15_characters_is_still_refused():
    with pytest.raises(service_settings.ConfigError) as refused:
        service_settings.load_config({"GRPC_AUTH_TOKEN": "t" * 15})
    assert str(refused.value) == "GRPC_AUTH_TOKEN: token 1 of 1 is shorter than 16 characters"


def test_w0_is_refused_suggesting_w_majority_and_why():
    with pytest.raises(service_settings.ConfigError) as refused:
        service_settings.load_config({"MONGO_URI": "mongodb://db/?w=0"})
    message = str(refused.value)
    assert message.startswith("MONGO_URI: w=0 (unacknowledged writes)")
    assert "use w=majority (MongoDB's default since 5.0)" in message and "w=1" in message
    assert "rolled back after a failover" in message
    assert "use w=1" not in message


@pytest.mark.parametrize("grpc_host, metrics_host", [("127.0.0.1", "127.0.0.1"), ("0.0.0.0", "127.0.0.1"),
                                                     ("127.0.0.1", "0.0.0.0")])
def test_metrics_port_on_the_grpc_port_stops_start_up_with_one_line_naming_it_and_exit_code_2(
        tmp_path, grpc_host, metrics_host):
    port = closed_port()
    done = run_server_process({"GRPC_HOST": grpc_host, "GRPC_PORT": str(port), "METRICS_HOST": metrics_host,
                               "METRICS_PORT": str(port)}, "--in-memory", cwd=tmp_path)
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(f"configuration error: METRICS_PORT: {port} is GRPC_PORT too")


@pytest.mark.parametrize("grpc_port, metrics_port", [(0, 0), ("free", 0), (0, "free")])
def test_port_0_picks_a_free_port_and_never_clashes(grpc_port, metrics_port):
    free = closed_port()
    config = service_settings.load_config({
        "GRPC_HOST": "127.0.0.1", "GRPC_PORT": str(free if grpc_port == "free" else grpc_port),
        "METRICS_PORT": str(free if metrics_port == "free" else metrics_port)})
    service_settings.check_listeners_apart(config)  # no ConfigError


def test_metrics_on_the_grpc_port_of_another_host_is_no_clash():
    port = closed_port()
    config = service_settings.load_config({"GRPC_HOST": "127.0.0.1", "GRPC_PORT": str(port),
                                           "METRICS_HOST": "127.0.0.2", "METRICS_PORT": str(port)})
    service_settings.check_listeners_apart(config)  # no ConfigError


def test_a_password_with_uri_delimiters_is_accepted_and_never_described(tmp_path):
    config = service_settings.load_config({"MONGO_URI": "mongodb://svc:pa[ss]w0rd-0123456789@db1,db2:27018/"})
    assert service_settings.describe_database(config) == "mongodb://db1:27017,db2:27018/CatalogServiceDB"


TLS_MISTAKES = {
    "a garbage certificate": ({"GRPC_TLS_CERT": "garbage"}, "GRPC_TLS_CERT: no PEM certificate in"),
    "a garbage key": ({"GRPC_TLS_KEY": "garbage"}, "GRPC_TLS_KEY: "),
    "a key of another certificate": ({"GRPC_TLS_KEY": "other_key"}, "GRPC_TLS_KEY: "),
    "an empty client CA": ({"GRPC_TLS_CLIENT_CA": "empty"}, "GRPC_TLS_CLIENT_CA: no PEM certificate in"),
    "a garbage client CA": ({"GRPC_TLS_CLIENT_CA": "garbage"}, "GRPC_TLS_CLIENT_CA: no PEM certificate in"),
}


@pytest.mark.parametrize("mistake, message", TLS_MISTAKES.values(), ids=TLS_MISTAKES.keys())
def test_tls_files_are_loaded_and_matched_before_grpc_sees_them(tls_files, mistake, message):
    env = {"GRPC_TLS_CERT": tls_files["cert"], "GRPC_TLS_KEY": tls_files["key"]}
    env.update({name: tls_files[file] for name, file in mistake.items()})
    with pytest.raises(service_settings.ConfigError) as refused:
        service_settings.load_config(env)
    assert str(refused.value).startswith(message)
    if "other_key" in mistake.values():
        assert "does not belong to the certificate in GRPC_TLS_CERT" in str(refused.value)


@pytest.mark.parametrize("env, variable", [
    ({"GRPC_AUTH_TOKEN": ","}, "GRPC_AUTH_TOKEN"),
    ({"MONGO_URI": "mongodb://svc:pa[ss-0123456789@[::1/"}, "MONGO_URI"),
    ({"MONGO_DB": "bad/name"}, "MONGO_DB"),
    ({"GRPC_HOST": "no-such-host.invalid"}, "GRPC_HOST"),
    ({"GRPC_HOST": "192.0.2.1"}, "GRPC_HOST"),  # TEST-NET-1: no address of this machine
    ({"GRPC_TLS_CERT": __file__, "GRPC_TLS_KEY": __file__}, "GRPC_TLS_CERT"),
], ids=["tokens", "uri", "database", "unresolvable host", "foreign host", "tls"])
def test_a_refused_setting_is_one_line_naming_it_and_exit_code_2(tmp_path, env, variable):
    done = run_server_process(env, "--in-memory", cwd=tmp_path)
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(f"configuration error: {variable}")
    assert "0123456789" not in line


def test_an_empty_exported_variable_may_not_hide_a_dotenv_value(tmp_path, monkeypatch):
    (tmp_path / ".env").write_text("MONGO_URI=mongodb://db.internal/\n")
    monkeypatch.setenv("MONGO_URI", "")
    with pytest.raises(service_settings.ConfigError,
                       match="MONGO_URI is exported empty, which would hide its value in .env"):
        service_settings.read_environment(tmp_path / ".env")


def test_a_dotenv_value_cut_at_an_unquoted_hash_is_refused_naming_the_variable(tmp_path):
    (tmp_path / ".env").write_text("MONGO_USER=catalog\nMONGO_PASSWORD=abcdefgh #ijklmnopqrstu\n")
    with pytest.raises(service_settings.ConfigError) as refused:
        service_settings.read_environment(tmp_path / ".env")
    assert str(refused.value) == (
        f"MONGO_PASSWORD in {tmp_path / '.env'} (line 2): an unquoted ' #' starts a comment, so the value is"
        " cut there; quote the value (MONGO_PASSWORD='...') or put the comment on a line of its own")
    assert "ijkl" not in str(refused.value)


def test_a_quoted_dotenv_value_keeps_its_hash(tmp_path):  # a guard: quoting is the way out
    (tmp_path / ".env").write_text("MONGO_PASSWORD='abcdefgh #ijklmnopqrstu'\n# a comment line\n")
    assert service_settings.read_environment(tmp_path / ".env")["MONGO_PASSWORD"] == "abcdefgh #ijklmnopqrstu"


def test_a_dotenv_file_open_to_others_is_warned_about_once_at_start(tmp_path):
    (tmp_path / ".env").write_text("MONGO_DB=FromFile\n")
    (tmp_path / ".env").chmod(0o644)
    done = run_server_process({}, "--in-memory", "--create-indexes", cwd=tmp_path)
    assert done.returncode == 0
    warnings = [line for line in done.stderr.splitlines() if "chmod" in line]
    assert len(warnings) == 1
    assert warnings[0].endswith(f" WARNING image_service: {tmp_path / '.env'} is open to group or others"
                                f" (mode 0644) and may hold passwords: chmod 600 {tmp_path / '.env'}")


def test_a_private_dotenv_file_gets_no_warning(tmp_path):  # a guard against crying wolf
    (tmp_path / ".env").write_text("MONGO_DB=FromFile\n")
    (tmp_path / ".env").chmod(0o600)
    assert service_settings.dotenv_permission_warning(tmp_path / ".env") is None


def test_secrets_are_redacted_only_where_they_stand_whole():
    secret = "tok-0123456789abcdef"
    line = f"auth=Bearer {secret}; next{secret}x; {secret}."
    assert service_settings.redact(line, [secret]) == f"auth=Bearer ***; next{secret}x; ***."


def test_settings_come_from_a_dotenv_file_and_the_environment_wins(tmp_path, monkeypatch):
    (tmp_path / ".env").write_text("MONGO_DB=FromFile\nMONGO_HOST=file-host\n")
    monkeypatch.setenv("MONGO_HOST", "env-host")
    config = service_settings.load_config(service_settings.read_environment(tmp_path / ".env"))
    assert (config.mongo_db, config.mongo_uri) == ("FromFile", "mongodb://env-host:27017/")


def test_env_example_lists_every_variable():
    with open(os.path.join(HERE, ".env.example")) as example:
        listed = {line.split("=")[0].lstrip("# ").strip() for line in example if "=" in line}
    with open(os.path.join(HERE, "image_service_settings.py")) as source:
        code = source.read()
    used = {name for name in listed if f'"{name}"' in code}
    assert listed == used
    for name in ("MONGO_URI", "MONGO_HOST", "MONGO_PORT", "MONGO_DB", "MONGO_USER", "MONGO_PASSWORD",
                 "MONGO_AUTH_SOURCE", "MONGO_TIMEOUT_MS", "GRPC_HOST", "GRPC_PORT",
                 "MAX_CONCURRENT_DELETIONS", "GRPC_MAX_CONCURRENT_RPCS", "GRPC_REFLECTION", "GRPC_TLS_CERT",
                 "GRPC_TLS_KEY",
                 "GRPC_TLS_CLIENT_CA", "GRPC_AUTH_TOKEN", "SHUTDOWN_DELAY_S", "SHUTDOWN_GRACE_S",
                 "HEALTH_CHECK_INTERVAL_S", "LOG_LEVEL", "LOG_FORMAT", "METRICS_PORT", "METRICS_HOST"):
        assert name in listed and f'"{name}"' in code, name


def test_the_deletions_limit_is_still_read_under_its_old_name():
    assert service_settings.load_config({"GRPC_MAX_WORKERS": "3"}).max_concurrent_deletions == 3
    both = {"GRPC_MAX_WORKERS": "3", "MAX_CONCURRENT_DELETIONS": "5"}
    assert service_settings.load_config(both).max_concurrent_deletions == 5


def test_a_single_quoted_dotenv_value_is_taken_literally(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", "/root")
    (tmp_path / ".env").write_text("MONGO_PASSWORD='a${HOME}b$c'\n")
    assert service_settings.read_environment(tmp_path / ".env")["MONGO_PASSWORD"] == "a${HOME}b$c"


@pytest.mark.parametrize("line", ['MONGO_HOST=${DB_NAME}.internal', 'MONGO_HOST="${DB_NAME}.internal"'],
                         ids=["unquoted", "double-quoted"])
def test_an_unquoted_or_double_quoted_dotenv_value_expands_a_name_from_the_lines_above(tmp_path, line):
    (tmp_path / ".env").write_text(f"DB_NAME=db7\n{line}\n")
    assert service_settings.read_environment(tmp_path / ".env")["MONGO_HOST"] == "db7.internal"


def test_the_database_named_in_mongo_uri_is_used_when_mongo_db_is_unset():
    config = service_settings.load_config({"MONGO_URI": "mongodb://db1/otherdb?authSource=admin"})
    assert config.mongo_db == "otherdb"
    assert service_settings.describe_database(config) == "mongodb://db1:27017/otherdb"


def test_mongo_db_naming_the_database_in_mongo_uri_too_is_accepted():
    config = service_settings.load_config({"MONGO_URI": "mongodb://db1/otherdb", "MONGO_DB": "otherdb"})
    assert config.mongo_db == "otherdb"


def test_mongo_db_and_another_database_in_mongo_uri_stop_start_up_with_one_line_naming_both(tmp_path):
    done = run_server_process({"MONGO_URI": "mongodb://127.0.0.1/otherdb", "MONGO_DB": "CatalogServiceDB"},
                              cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "configuration error: MONGO_DB is 'CatalogServiceDB' but MONGO_URI names the database 'otherdb';"
        " unset MONGO_DB, or make the two the same"]


def test_a_mongodb_srv_uri_is_described_without_a_port():
    config = service_settings.load_config({"MONGO_URI": "mongodb+srv://u:p-0123456789abcdef@cluster0.example.net/"})
    assert service_settings.describe_database(config) == "mongodb+srv://cluster0.example.net/CatalogServiceDB"


def test_the_server_reads_the_file_env_file_names(tmp_path):
    (tmp_path / "env").write_text("MONGO_DB=FromEnvFile\nMONGO_PASSWORD='x${HOME}'\nMONGO_USER=svc\n")
    (tmp_path / "env").chmod(0o600)
    done = run_server_process({}, "--env-file", str(tmp_path / "env"), "--in-memory", "--create-indexes",
                              cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("indexes present on in-memory stand-in/FromEnvFile: ")


def test_an_env_file_that_is_missing_stops_start_up_with_one_line(tmp_path):
    done = run_server_process({}, "--env-file", str(tmp_path / "missing"), "--in-memory", cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"configuration error: --env-file: cannot read {tmp_path / 'missing'}: no such file"]
