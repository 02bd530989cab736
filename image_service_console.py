"""The console: what the server's command line tells its operator in words.

This module owns the texts of ``image_service_server.py``'s command line
that are not a call's log line: where settings come from (``--help``), the
in-memory server's "try:" hint, the one line of an operator's tool
(``--create-indexes``, ``--sweep-orphans``) that cannot do its work, and a
configuration error, in the log format asked for even before logging is
configured.
"""

import logging
import sys

import pymongo.errors

from image_service_observability import describe_failure, json_formatter
from image_service_settings import host_in_uri
from image_service_store import SAMPLE_MODELS

SETTINGS_HELP = (
    "Settings come from the environment, then from a .env file in the working directory, or from the"
    " file --env-file names; the environment wins. The README's Settings table and .env.example list"
    " every one. In the file, a single-quoted value is taken literally; in an unquoted or double-quoted"
    " one, ${NAME} is replaced by NAME's value.")

# A wildcard listen address is reached on loopback.
_LOOPBACK_FOR = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}


def in_memory_hint(config, port):
    """The client command that deletes a sample model from the in-memory
    server listening on ``port``, with the TLS and token options it needs.
    Never a token itself: the hint says where to find one."""
    host = host_in_uri(_LOOPBACK_FOR.get(config.grpc_host, config.grpc_host))
    command = (f".venv/bin/python image_service_client.py {next(iter(SAMPLE_MODELS))}"
               f" --address {host}:{port}")
    where = []
    if config.tls_cert:
        command += " --tls-ca CA.pem"
        where.append("CA.pem: the CA that signed GRPC_TLS_CERT")
    if config.tls_client_ca:
        command += " --tls-cert CERT.pem --tls-key KEY.pem"
        where.append("CERT.pem, KEY.pem: a client certificate GRPC_TLS_CLIENT_CA signed")
    if config.auth_tokens:
        command += " --token TOKEN"
        where.append("TOKEN: one of GRPC_AUTH_TOKEN")
    legend = f" ({'; '.join(where)})" if where else ""
    return (f"in-memory MongoDB stand-in with sample models {', '.join(SAMPLE_MODELS)}; try: {command}"
            f"{legend}")


def tool_failure(action, error, database_description):
    """An operator's tool's failure in one line, the same for every tool:
    MongoDB out of reach names where it was looked for and the settings
    that say so; any other driver failure, its kind and reason."""
    if isinstance(error, pymongo.errors.ConnectionFailure):
        return (f"{action}: cannot reach MongoDB at {database_description}: {describe_failure(error)};"
                " check MONGO_URI, or MONGO_HOST and MONGO_PORT")
    return f"{action}: {type(error).__name__}: {describe_failure(error)}"


def configuration_error_line(error, env):
    """A configuration error as one line: plain text, or a JSON object when
    LOG_FORMAT asks for JSON (read here directly: the error may be that the
    rest of the settings could not be read)."""
    line = f"configuration error: {error}"
    if (env.get("LOG_FORMAT") or "").strip().lower() != "json":
        return line
    record = logging.LogRecord("image_service", logging.ERROR, __file__, 0, line, None, None)
    return json_formatter().format(record)


def report_configuration_error(error, env, stream=None):
    print(configuration_error_line(error, env), file=stream or sys.stderr)
