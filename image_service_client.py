"""Command-line client for the image service.

    python image_service_client.py MODEL_ID [MODEL_ID ...] [--address HOST:PORT]
    python image_service_client.py health [--address HOST:PORT]

Several model ids go as one DeleteImagesByModelIds batch; one id uses
DeleteImageByModelId, the call the catalog service makes. Each result is
printed on its own line. Exit codes: 0 all succeeded (or SERVING), 1 some
failed (or NOT_SERVING), 2 bad usage, 3 the call itself failed.

Every option can also come from the environment: IMAGE_SERVICE_ADDRESS,
IMAGE_SERVICE_TOKEN, IMAGE_SERVICE_TLS_CA, IMAGE_SERVICE_TLS_CERT,
IMAGE_SERVICE_TLS_KEY, IMAGE_SERVICE_TIMEOUT.
"""

import argparse
import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

import image_service_pb2 as pb2
import image_service_pb2_grpc as pb2_grpc


def parse_arguments(argv):
    env = os.environ.get
    parser = argparse.ArgumentParser(description="Delete the images of models, or check the service's health.")
    parser.add_argument("model_ids", nargs="+", metavar="MODEL_ID",
                        help="models whose images to delete; or the single word 'health'")
    parser.add_argument("--address", default=env("IMAGE_SERVICE_ADDRESS", "localhost:5014"))
    parser.add_argument("--token", default=env("IMAGE_SERVICE_TOKEN"), help="bearer token")
    parser.add_argument("--tls-ca", default=env("IMAGE_SERVICE_TLS_CA"),
                        help="CA certificate that signed the server's: use TLS")
    parser.add_argument("--tls-cert", default=env("IMAGE_SERVICE_TLS_CERT"), help="client certificate, for mTLS")
    parser.add_argument("--tls-key", default=env("IMAGE_SERVICE_TLS_KEY"), help="client key, for mTLS")
    parser.add_argument("--timeout", type=float, default=float(env("IMAGE_SERVICE_TIMEOUT", "10")),
                        help="seconds before the call is abandoned (its deadline)")
    args = parser.parse_args(argv)
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


def check_health(channel, timeout):
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(status)
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


def delete_images(channel, model_ids, timeout, metadata):
    stub = pb2_grpc.ImageServiceStub(channel)
    if len(model_ids) == 1:
        results = [stub.DeleteImageByModelId(pb2.DeleteImageRequest(model_id=model_ids[0]),
                                             timeout=timeout, metadata=metadata)]
    else:
        results = stub.DeleteImagesByModelIds(pb2.DeleteImagesRequest(model_ids=model_ids),
                                              timeout=timeout, metadata=metadata).results
    for result in results:
        print(f"{result.model_id}\t{'ok' if result.success else 'FAILED'}\t{pb2.Outcome.Name(result.outcome)}"
              f"\timages={result.deleted_images}\tfiles={result.deleted_files}\t{result.message}")
    return 0 if all(result.success for result in results) else 1


def main(argv=None):
    args = parse_arguments(argv)
    metadata = [("authorization", f"Bearer {args.token}")] if args.token else None
    try:
        with open_channel(args) as channel:
            if args.model_ids == ["health"]:
                return check_health(channel, args.timeout)
            return delete_images(channel, args.model_ids, args.timeout, metadata)
    except grpc.RpcError as error:
        print(f"call failed: {error.code().name}: {error.details()}", file=sys.stderr)
        return 3
    except OSError as error:
        print(f"cannot read {error.filename}: {error.strerror}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
