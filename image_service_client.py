"""Command-line client for the image service.

    .venv/bin/python image_service_client.py MODEL_ID [MODEL_ID ...] [--address HOST:PORT] [--dry-run]
    .venv/bin/python image_service_client.py health [--address HOST:PORT] [--wait-for-ready]

Several model ids go as one DeleteImagesByModelIds batch; one id uses
DeleteImageByModelId, the call the catalog service makes. Each result is
printed on its own line, and the call's request id on stderr, whatever
becomes of the call (a new one is sent when --request-id is not given), so
the call can be found in the server's log. Exit codes:
0 all succeeded (or SERVING), 1 some failed (or NOT_SERVING), 2 bad usage,
3 the call itself failed, 130 interrupted.

An option not given on the command line comes from the environment:
IMAGE_SERVICE_ADDRESS, IMAGE_SERVICE_TOKEN, IMAGE_SERVICE_TLS_CA,
IMAGE_SERVICE_TLS_CERT, IMAGE_SERVICE_TLS_KEY, IMAGE_SERVICE_TIMEOUT. The
environment is read only for options not given, so a bad value there never
breaks --help or a call that passes the option.
"""

import argparse
import os
import re
import sys
import uuid

# gRPC core's own log lines (a failed TLS handshake's, say) would come
# before the client's one line: errors only, unless asked for. gRPC reads
# this once, when it is imported.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

import image_service_pb2 as pb2
import image_service_pb2_grpc as pb2_grpc


class UsageError(ValueError):
    """A bad option or environment variable; the message names it."""


def seconds(text):
    """A timeout: a number of seconds above 0."""
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is None or not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number of seconds above 0, got {text!r}")
    return value


def address(text):
    """HOST:PORT, the port spelled out (gRPC would quietly take 443)."""
    match = re.fullmatch(r"(\[[0-9A-Fa-f:.]+\]|[^:\[\]]+):(\d{1,5})", text)
    if not match or not 0 < int(match.group(2)) < 65536:
        raise argparse.ArgumentTypeError(f"must be HOST:PORT (e.g. localhost:5014), got {text!r}")
    return text


DEFAULT_ADDRESS = "localhost:5014"
DEFAULT_TIMEOUT_S = "10"


def _from_environment(name, parse, default):
    """The option's value from ``name`` (or ``default``), parsed; a bad value names the variable."""
    raw = os.environ.get(name) or default
    try:
        return parse(raw)
    except argparse.ArgumentTypeError as error:
        raise UsageError(f"{name} {error}") from None


def build_parser():
    """The command line; defaults that come from the environment are filled in after parsing."""
    env = os.environ.get
    parser = argparse.ArgumentParser(
        description="Delete the images of models, or check the service's health.")
    parser.add_argument("model_ids", nargs="+", metavar="MODEL_ID",
                        help="models whose images to delete; or the single word 'health'")
    parser.add_argument("--address", type=address, metavar="HOST:PORT",
                        help="the service's address (default: $IMAGE_SERVICE_ADDRESS, else"
                             f" {DEFAULT_ADDRESS})")
    parser.add_argument("--token", default=env("IMAGE_SERVICE_TOKEN"),
                        help="bearer token (default: $IMAGE_SERVICE_TOKEN)")
    parser.add_argument("--tls-ca", default=env("IMAGE_SERVICE_TLS_CA"), metavar="CA.pem",
                        help="CA certificate that signed the server's: use TLS"
                             " (default: $IMAGE_SERVICE_TLS_CA)")
    parser.add_argument("--tls-cert", default=env("IMAGE_SERVICE_TLS_CERT"), metavar="CERT.pem",
                        help="client certificate, for mTLS (default: $IMAGE_SERVICE_TLS_CERT)")
    parser.add_argument("--tls-key", default=env("IMAGE_SERVICE_TLS_KEY"), metavar="KEY.pem",
                        help="client key, for mTLS (default: $IMAGE_SERVICE_TLS_KEY)")
    parser.add_argument("--timeout", type=seconds, metavar="SECONDS",
                        help="seconds before the call is abandoned, its deadline (default:"
                             f" $IMAGE_SERVICE_TIMEOUT, else {DEFAULT_TIMEOUT_S})")
    parser.add_argument("--dry-run", action="store_true", help="only say what would be deleted")
    parser.add_argument("--request-id", help="sent as x-request-id, to find this call in the server's log"
                                             " (default: a new one, printed on stderr)")
    parser.add_argument("--wait-for-ready", action="store_true",
                        help="wait up to --timeout for the server to come up (health: to answer SERVING)"
                             " instead of failing at once; for scripts that have just started it")
    return parser


def parse_arguments(argv):
    """The options; the environment is read only for an option not given."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.address is None:
        args.address = _from_environment("IMAGE_SERVICE_ADDRESS", address, DEFAULT_ADDRESS)
    if args.timeout is None:
        args.timeout = _from_environment("IMAGE_SERVICE_TIMEOUT", seconds, DEFAULT_TIMEOUT_S)
    if (args.tls_cert is None) != (args.tls_key is None):
        parser.error("--tls-cert and --tls-key go together")
    if args.tls_cert and not args.tls_ca:
        parser.error("--tls-cert needs --tls-ca")
    return args


def _read(path):
    with open(path, "rb") as file:
        return file.read()


def open_channel(args):
    if not args.tls_ca:
        return grpc.insecure_channel(args.address)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=_read(args.tls_ca),
        private_key=_read(args.tls_key) if args.tls_key else None,
        certificate_chain=_read(args.tls_cert) if args.tls_cert else None,
    )
    return grpc.secure_channel(args.address, credentials)


SERVING = health_pb2.HealthCheckResponse.SERVING


def check_health(channel, timeout, wait_for_ready):
    stub = health_pb2_grpc.HealthStub(channel)
    if wait_for_ready:
        status = _first_serving_status(stub, timeout)
    else:
        status = stub.Check(health_pb2.HealthCheckRequest(), timeout=timeout).status
    print(health_pb2.HealthCheckResponse.ServingStatus.Name(status))
    return 0 if status == SERVING else 1


def _first_serving_status(stub, timeout):
    """SERVING as soon as the server says so, within ``timeout``; else the
    last status it gave. A server not up yet is waited for, not failed."""
    updates = stub.Watch(health_pb2.HealthCheckRequest(), timeout=timeout, wait_for_ready=True)
    status = None
    try:
        for update in updates:
            status = update.status
            if status == SERVING:
                break
    except grpc.RpcError as error:
        if status is None or error.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
            raise
    finally:
        updates.cancel()
    return status


def delete_images(channel, model_ids, args, metadata):
    stub = pb2_grpc.ImageServiceStub(channel)
    options = {"timeout": args.timeout, "metadata": metadata, "wait_for_ready": args.wait_for_ready}
    if len(model_ids) == 1:
        reply, call = stub.DeleteImageByModelId.with_call(
            pb2.DeleteImageRequest(model_id=model_ids[0], validate_only=args.dry_run), **options)
        results = [reply]
    else:
        reply, call = stub.DeleteImagesByModelIds.with_call(
            pb2.DeleteImagesRequest(model_ids=model_ids, validate_only=args.dry_run), **options)
        results = reply.results
    print_request_id(call, metadata)
    for result in results:
        print(f"{result.model_id}\t{'ok' if result.success else 'FAILED'}\t{pb2.Outcome.Name(result.outcome)}"
              f"\timages={result.deleted_images}\tfiles={result.deleted_files}\t{result.message}")
    return 0 if all(result.success for result in results) else 1


def print_request_id(call, metadata):
    """The request id the server answered with, else the one sent."""
    answered = dict(call.trailing_metadata() or ()) if call is not None else {}
    request_id = answered.get("x-request-id") or dict(metadata).get("x-request-id")
    print(f"request_id={request_id}", file=sys.stderr)


TLS_HINT_PLAINTEXT = " (if the server serves TLS, pass --tls-ca)"
TLS_HINT_TLS = (" (TLS handshake failed? check that the server serves TLS, that --tls-ca signed its"
                " certificate, and --tls-cert/--tls-key if it requires client certificates)")


def tls_mismatch_likely(details):
    """Whether a connection failed while it was being set up, the way a TLS mismatch fails.

    A TLS server hangs up on a plaintext client ("Socket closed"); a plaintext
    server or a foreign certificate fails the client's handshake. A closed port
    ("Connection refused") or a server cancelling calls as it shuts down is no
    TLS matter.
    """
    text = (details or "").lower()
    if "failed to connect" not in text:
        return False
    return "handshake" in text or "socket closed" in text


def explain(error, args):
    """The failed call in one line, with a hint when one is likely to help."""
    details = error.details()
    line = f"call failed: {error.code().name}: {details}"
    if error.code() == grpc.StatusCode.UNAVAILABLE:
        if tls_mismatch_likely(details):
            line += TLS_HINT_TLS if args.tls_ca else TLS_HINT_PLAINTEXT
        elif "connection refused" in (details or "").lower():
            line += f" (nothing listens at {args.address}: is the server running there?)"
    elif error.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
        line += f" (no answer within --timeout {args.timeout:g} s)"
    elif error.code() == grpc.StatusCode.UNAUTHENTICATED:
        line += (" (the token given was not accepted: check --token or IMAGE_SERVICE_TOKEN)" if args.token
                 else " (the server wants a token: pass --token or set IMAGE_SERVICE_TOKEN)")
    return line


def main(argv=None):
    try:
        args = parse_arguments(argv)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    deleting = args.model_ids != ["health"]
    metadata = [("x-request-id", args.request_id or uuid.uuid4().hex)]
    if args.token:
        metadata.append(("authorization", f"Bearer {args.token}"))
    try:
        with open_channel(args) as channel:
            if not deleting:
                return check_health(channel, args.timeout, args.wait_for_ready)
            return delete_images(channel, args.model_ids, args, metadata)
    except grpc.RpcError as error:
        if deleting:
            print_request_id(error, metadata)
        print(explain(error, args), file=sys.stderr)
        return 3
    except OSError as error:
        print(f"cannot read {error.filename}: {error.strerror}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if deleting:
            print_request_id(None, metadata)
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
