"""Settings: everything the service reads from its environment, checked
before anything listens.

This module owns the ``Config`` dataclass and its defaults, the readers of
environment variables and of an optional ``.env`` file, the checks of TLS
files, bearer tokens, the MongoDB connection string and listen addresses,
and the redaction of secrets. A bad setting raises ``ConfigError`` with a
message naming the variable; the server prints it as one line and exits 2.
"""

import contextlib
import dataclasses
import errno
import ipaddress
import os
import re
import socket
import ssl
import urllib.parse

import dotenv.parser
import dotenv.variables
import grpc
import pymongo.uri_parser


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
    max_concurrent_deletions: int = 10
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
        if "KEY_VALUES_MISMATCH" in str(error):
            problem = "does not belong to the certificate in GRPC_TLS_CERT"
        else:
            problem = "is not an unencrypted PEM private key"
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


def host_in_uri(host):
    """An IPv6 literal needs brackets inside a URI."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def build_mongo_uri(env):
    """The MongoDB connection string: MONGO_URI as given, or built from parts.

    Credentials are percent-escaped so that any character may appear in them;
    with no MONGO_USER the URI carries no credentials at all.
    """
    if _text(env, "MONGO_URI"):
        return env["MONGO_URI"]
    host = host_in_uri(_mongo_host(env))
    port = _number(env, "MONGO_PORT", 27017, 1, 65535)
    user, password = _text(env, "MONGO_USER"), _text(env, "MONGO_PASSWORD")
    if not user:
        if password:
            raise ConfigError("MONGO_PASSWORD is set but MONGO_USER is not; set MONGO_USER too, or unset"
                              " MONGO_PASSWORD to connect without credentials")
        return f"mongodb://{host}:{port}/"
    if not password:
        raise ConfigError("MONGO_USER is set but MONGO_PASSWORD is not; set MONGO_PASSWORD too, or unset"
                          " MONGO_USER to connect without credentials")
    credentials = urllib.parse.quote_plus(user) + ":" + urllib.parse.quote_plus(password)
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
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        reason = redact(first_line, _uri_passwords(uri))
        raise ConfigError(f"MONGO_URI: {reason}") from None
    if parsed["options"].get("w") == 0:
        raise ConfigError("MONGO_URI: w=0 (unacknowledged writes) would leave every delete unverifiable;"
                          " use w=majority (MongoDB's default since 5.0): a delete acknowledged with w=1"
                          " can be rolled back after a failover, once success was answered")
    return {**parsed, "scheme": scheme}


def describe_database(config):
    """Where the data lives, for logs: scheme, hosts and name, no credentials."""
    parsed = parse_mongo_uri(config.mongo_uri)
    if parsed["scheme"] == "mongodb+srv":  # one DNS name; the driver looks up the hosts and ports
        hosts = ",".join(host_in_uri(host) for host, _ in parsed["nodelist"])
    else:
        hosts = ",".join(f"{host_in_uri(host)}:{port}" for host, port in parsed["nodelist"])
    return f"{parsed['scheme']}://{hosts}/{config.mongo_db}"


def _check_database_name(name, variable):
    """MongoDB's rules for a database name (the stricter, portable ones)."""
    if len(name.encode()) >= 64 or re.search(r'[/\\. "$*<>:|?\x00]', name):
        raise ConfigError(f"{variable} must be under 64 bytes with none of / \\ . \" $ * < > : | ? or a"
                          f" space, got {name[:80]!r}")
    return name


def _database_name(env, parsed_uri):
    """MONGO_DB, else the database MONGO_URI names, else the default. Both
    naming one, and different ones, stops start-up: serving the wrong
    database must not depend on which of the two was looked at."""
    named = _text(env, "MONGO_DB")
    in_uri = parsed_uri["database"] if _text(env, "MONGO_URI") else None
    if named and in_uri and named != in_uri:
        raise ConfigError(f"MONGO_DB is {named[:80]!r} but MONGO_URI names the database {in_uri[:80]!r};"
                          " unset MONGO_DB, or make the two the same")
    if named:
        return _check_database_name(named, "MONGO_DB")
    if in_uri:
        return _check_database_name(in_uri, "MONGO_URI's database")
    return Config.mongo_db


def load_config(env):
    """Reads and checks every setting; raises ConfigError naming the culprit."""
    # The password, of any length: the database administrator chooses it, not this service.
    password = _text(env, "MONGO_PASSWORD")
    mongo_uri = build_mongo_uri(env)
    parsed_uri = parse_mongo_uri(mongo_uri)
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
        mongo_db=_database_name(env, parsed_uri),
        mongo_timeout_s=_number(env, "MONGO_TIMEOUT_MS", Config.mongo_timeout_s * 1000, 1, 600_000) / 1000,
        grpc_host=_text(env, "GRPC_HOST", Config.grpc_host),
        grpc_port=_number(env, "GRPC_PORT", Config.grpc_port, 0, 65535),
        # GRPC_MAX_WORKERS is the setting's old name, still read.
        max_concurrent_deletions=_number(env, "MAX_CONCURRENT_DELETIONS", _number(
            env, "GRPC_MAX_WORKERS", Config.max_concurrent_deletions, 1, 1000), 1, 1000),
        max_concurrent_rpcs=_number(env, "GRPC_MAX_CONCURRENT_RPCS", Config.max_concurrent_rpcs, 1, 100_000),
        reflection=_boolean(env, "GRPC_REFLECTION", Config.reflection),
        tls_cert=cert,
        tls_key=key,
        tls_client_ca=client_ca,
        auth_tokens=tokens,
        shutdown_delay_s=_number(env, "SHUTDOWN_DELAY_S", Config.shutdown_delay_s, 0, 3600, float),
        shutdown_grace_s=_number(env, "SHUTDOWN_GRACE_S", Config.shutdown_grace_s, 0.001, 3600, float),
        health_interval_s=_number(env, "HEALTH_CHECK_INTERVAL_S", Config.health_interval_s, 0.001, 3600,
                                  float),
        metrics_host=_text(env, "METRICS_HOST", _text(env, "GRPC_HOST", Config.grpc_host)),
        metrics_port=_number(env, "METRICS_PORT", None, 0, 65535),
        log_level=_choice(env, "LOG_LEVEL", Config.log_level, ("debug", "info", "warning", "error")).upper(),
        log_format=_choice(env, "LOG_FORMAT", Config.log_format, ("text", "json")),
        secrets=tuple(s for s in (*secrets, *_uri_passwords(mongo_uri), *tokens) if s),
    )


def _dotenv_bindings(dotenv_path, required):
    """The ``NAME=value`` lines of a ``.env`` file as python-dotenv parses
    them; none when the file is missing and not ``required``."""
    try:
        with open(dotenv_path, encoding="utf-8") as file:
            return [binding for binding in dotenv.parser.parse_stream(file) if binding.key is not None]
    except FileNotFoundError:
        if required:
            raise ConfigError(f"--env-file: cannot read {dotenv_path}: no such file") from None
        return []
    except OSError as error:
        raise ConfigError(f"--env-file: cannot read {dotenv_path}: {error.strerror}") from None


def _raw_value(binding):
    """The value as written, quotes and all."""
    return binding.original.string.partition("=")[2].strip()


def _check_dotenv_comments(dotenv_path, bindings):
    """Refuses a ``.env`` value that python-dotenv cuts at an unquoted `` #``
    (the rest reads as a comment): a password cut there fails far from here,
    or not at all. Inline comments are lost too; a line of their own keeps them."""
    for binding in bindings:
        raw = _raw_value(binding)
        if binding.value is not None and not raw.startswith(("'", '"')) and raw != binding.value:
            raise ConfigError(
                f"{binding.key} in {dotenv_path} (line {binding.original.line}): an unquoted ' #' starts"
                f" a comment, so the value is cut there; quote the value ({binding.key}='...') or put"
                " the comment on a line of its own")


def _dotenv_values(bindings):
    """Each variable's value. A single-quoted value is taken literally, as
    a shell and systemd's ``EnvironmentFile=`` take it; in an unquoted or
    double-quoted one, ``${NAME}`` (or ``${NAME:-default}``) is replaced by
    NAME from the lines above, else from the environment, as python-dotenv
    does (which would expand inside single quotes too)."""
    values = {}
    for binding in bindings:
        if binding.value is None or _raw_value(binding).startswith("'"):
            values[binding.key] = binding.value
            continue
        known = {**os.environ, **values}
        values[binding.key] = "".join(atom.resolve(known)
                                      for atom in dotenv.variables.parse_variables(binding.value))
    return values


def dotenv_permission_warning(dotenv_path=".env"):
    """A warning when ``.env`` (which may hold passwords) is open to group or
    others, or None."""
    try:
        mode = os.stat(dotenv_path).st_mode & 0o777
    except OSError:
        return None
    if not mode & 0o077:
        return None
    path = os.path.abspath(dotenv_path)
    return f"{path} is open to group or others (mode {mode:04o}) and may hold passwords: chmod 600 {path}"


def read_environment(dotenv_path=".env", required=False):
    """The process environment over the values of a ``.env`` file (or the
    file ``--env-file`` names, which must exist). A variable exported empty
    while the file gives it a value is refused: it would silently turn that
    value back into the default. So is a value cut at an unquoted `` #``."""
    bindings = _dotenv_bindings(dotenv_path, required)
    _check_dotenv_comments(dotenv_path, bindings)
    from_file = _dotenv_values(bindings)
    where = ".env" if os.path.basename(dotenv_path) == ".env" else dotenv_path
    for name, value in os.environ.items():
        if value == "" and from_file.get(name):
            raise ConfigError(f"{name} is exported empty, which would hide its value in {where};"
                              " unset it or give it a value")
    return {**from_file, **os.environ}


def server_credentials(config):
    """The gRPC server's TLS credentials (mTLS with a client CA), or None for plaintext."""
    if config.tls_cert is None:
        return None
    return grpc.ssl_server_credentials(
        [(config.tls_key, config.tls_cert)],
        root_certificates=config.tls_client_ca,
        require_client_auth=config.tls_client_ca is not None,
    )


def check_listen_address(host, port, prefix="GRPC"):
    """Binds and lets go of the address, so that an unusable host or a port
    in use stops start-up naming PREFIX_HOST or PREFIX_PORT, before anything
    listens and before gRPC can print its own error lines."""
    _bound(host, port, prefix).close()


def _bound(host, port, prefix):
    """A socket bound to the address as gRPC binds it (not listening), or
    ConfigError naming PREFIX_HOST or PREFIX_PORT."""
    try:
        family, kind, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)[0]
    except (socket.gaierror, UnicodeError):
        raise ConfigError(f"{prefix}_HOST: cannot resolve {host[:80]!r}") from None
    probe = socket.socket(family, kind)
    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC binds
    try:
        probe.bind(address)
    except OSError as error:
        probe.close()
        variable = f"{prefix}_PORT" if error.errno == errno.EADDRINUSE else f"{prefix}_HOST"
        reason = error.strerror.lower()
        raise ConfigError(f"{variable}: cannot listen on {host}:{port}: {reason}") from None
    return probe


def check_listeners_apart(config):
    """METRICS_PORT on GRPC_PORT, where the hosts overlap (the same address,
    or 0.0.0.0 or :: and any), would fail only once gRPC listens: tried here
    with gRPC's address listening, it stops start-up naming METRICS_PORT.
    Port 0 picks a free port, which never clashes."""
    port = config.metrics_port
    if not port or port != config.grpc_port:
        return
    with _bound(config.grpc_host, port, "GRPC") as grpc_listener:
        grpc_listener.listen()
        try:
            _bound(config.metrics_host, port, "METRICS").close()
        except ConfigError:
            raise ConfigError(f"METRICS_PORT: {port} is GRPC_PORT too, and METRICS_HOST"
                              f" {config.metrics_host} overlaps GRPC_HOST {config.grpc_host};"
                              " give metrics a port of its own") from None

