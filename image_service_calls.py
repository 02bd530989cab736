"""Call plumbing: what happens around every call before and after the servicer.

This module owns the three grpc.aio interceptors and what they need: request
ids, the one log line per call, bearer tokens, and the admission bound on
deletes in flight, with the kit that re-wraps a method's handler (built once
per method). The server names their order in one place, ``start_server``:
``CallInterceptor`` outermost, then ``BearerTokenInterceptor``, then
``Admission``, then the servicer.
"""

import asyncio
import collections
import contextlib
import contextvars
import dataclasses
import functools
import hmac
import inspect
import logging
import time
import uuid

import grpc

import image_service_pb2 as pb2

log = logging.getLogger("image_service.calls")

MAX_REQUEST_ID_LENGTH = 64
LOGGED_ID_LENGTH = 80  # characters of a model id in a log line
IDS_NAMED_IN_A_LINE = 5  # model ids named in a batch's log line


def quoted(model_id, limit=LOGGED_ID_LENGTH):
    """A model id as it may appear in a log line: quoted, escaped, bounded."""
    return repr(model_id[:limit]) + ("..." if len(model_id) > limit else "")


def quoted_ids(model_ids):
    """The first few model ids of a batch, quoted, and how many more there are."""
    named = ",".join(quoted(model_id) for model_id in model_ids[:IDS_NAMED_IN_A_LINE])
    if len(model_ids) > IDS_NAMED_IN_A_LINE:
        named += f",...(+{len(model_ids) - IDS_NAMED_IN_A_LINE})"
    return named


def request_id_of(metadata):
    """The caller's ``x-request-id``, bounded and reduced to safe characters,
    or a new one."""
    given = dict(metadata or ()).get("x-request-id", "")
    if isinstance(given, bytes):
        given = given.decode("ascii", "replace")
    safe = "".join(ch for ch in given if ch.isascii() and (ch.isalnum() or ch in "-_.:/"))
    return safe[:MAX_REQUEST_ID_LENGTH] or uuid.uuid4().hex


@dataclasses.dataclass
class Call:
    """One call as its log line tells it. ``fields`` are the line's
    structured fields (JSON keys), taken from the request and the reply;
    the text line says the same of the reply in words (``_summary``)."""

    method: str
    request_id: str
    peer: str
    model_ids: list = dataclasses.field(default_factory=list)
    fields: dict = dataclasses.field(default_factory=dict)


CURRENT_CALL = contextvars.ContextVar("current_call")


def _model_ids_of(request):
    """The model ids a request names, for its log line."""
    if isinstance(request, pb2.DeleteImageRequest):
        return [request.model_id]
    if isinstance(request, pb2.DeleteImagesRequest):
        return list(request.model_ids)
    return []


def _request_fields(request):
    """What a request says, as structured fields of its log line; model
    ids bounded as in the text line."""
    if isinstance(request, pb2.DeleteImageRequest):
        return {"model_id": request.model_id[:LOGGED_ID_LENGTH], "dry_run": request.validate_only}
    if isinstance(request, pb2.DeleteImagesRequest):
        named = [model_id[:LOGGED_ID_LENGTH] for model_id in request.model_ids[:IDS_NAMED_IN_A_LINE]]
        return {"models": len(request.model_ids), "model_ids": named, "dry_run": request.validate_only}
    return {}


def _reply_fields(reply):
    """What a reply says, as structured fields: a single delete's outcome,
    or a batch's outcomes counted; the images and files removed."""
    if isinstance(reply, pb2.DeleteImageResponse):
        return {"outcome": pb2.Outcome.Name(reply.outcome), "deleted_images": reply.deleted_images,
                "deleted_files": reply.deleted_files}
    if isinstance(reply, pb2.DeleteImagesResponse):
        outcomes = collections.Counter(pb2.Outcome.Name(result.outcome) for result in reply.results)
        return {"outcomes": dict(outcomes), "deleted_images": sum(r.deleted_images for r in reply.results),
                "deleted_files": sum(r.deleted_files for r in reply.results)}
    return {}


def _summary(fields):
    """The text line's account of a delete's reply: a dry run or not, the
    outcome (a batch's, counted by kind) and the totals removed."""
    if "deleted_images" not in fields:
        return ""
    told = f"outcomes={fields['outcomes']}" if "outcomes" in fields else f"outcome={fields['outcome']}"
    return (f" {'dry_run ' if fields.get('dry_run') else ''}{told}"
            f" deleted_images={fields['deleted_images']} deleted_files={fields['deleted_files']}")


def _log_call(call, status, level, ms):
    """The call's one log line: method, status, request id, peer, the model
    ids it named and what the servicer summed up; the same as structured
    fields, for JSON lines."""
    if call.method == "DeleteImageByModelId" and call.model_ids:
        ids = f" model_id={quoted(call.model_ids[0])}"
    elif call.model_ids:
        ids = f" models={len(call.model_ids)} ids={quoted_ids(call.model_ids)}"
    else:
        ids = ""
    summary = _summary(call.fields)
    if status != "OK" and not (status == "CANCELLED" and level == logging.DEBUG):
        level = logging.WARNING  # a refused or failed call; a probe that hung up is no news
    fields = {"request_id": call.request_id, "method": call.method, "status": status, **call.fields,
              "duration_ms": round(ms, 1), "peer": call.peer}
    log.log(level, "%s status=%s request_id=%s peer=%s%s%s ms=%.1f", call.method, status, call.request_id,
            call.peer, ids, summary, ms, extra=fields)


class _Unparsable:
    """Stands in for a request body that does not parse."""


class CallInterceptor(grpc.aio.ServerInterceptor):
    """Around every call: a request id (the caller's ``x-request-id`` or a new
    one, returned in the trailing metadata), a request body that does not
    parse answered with INVALID_ARGUMENT and no traceback, and one log line
    with method, status, request id and peer. Health and reflection calls
    log at DEBUG: probes would flood the log. ``call_observer(call, status)``,
    if given, sees each call as it ends, before its line is written (tracing
    adds the trace id to the line's fields)."""

    _QUIET_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")

    def __init__(self, call_duration, call_observer=None):
        self._call_duration = call_duration
        self._call_observer = call_observer
        self._wrapped = _WrappedHandlers(self._wrap)

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        return handler and self._wrapped.get(handler_call_details.method, handler)

    def _wrap(self, full_method, handler):
        method = full_method.rsplit("/", 1)[-1]
        level = logging.DEBUG if full_method.startswith(self._QUIET_PREFIXES) else logging.INFO
        duration = functools.partial(self._call_duration.labels, full_method.lstrip("/"))

        def parse(body, deserialize=handler.request_deserializer):
            try:
                return deserialize(body) if deserialize else body
            except Exception:  # Bad bytes are the caller's problem, not ours.
                return _Unparsable()

        async def behavior(request, context):
            request_id = request_id_of(context.invocation_metadata())
            call = Call(method, request_id, context.peer(), _model_ids_of(request),
                        fields=_request_fields(request))
            CURRENT_CALL.set(call)
            context.set_trailing_metadata((("x-request-id", call.request_id),))
            started, status = time.monotonic(), "OK"
            try:
                if isinstance(request, _Unparsable):
                    await context.abort(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        "the request body is not a valid message (bad bytes or invalid UTF-8)")
                reply = await _run_behavior(_behavior_of(handler), request, context)
                call.fields.update(_reply_fields(reply))
                return reply
            except asyncio.CancelledError:
                # gRPC cancels a call whose deadline passed, as one whose caller hung up.
                remaining = context.time_remaining()
                status = "DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0 else "CANCELLED"
                raise
            except grpc.aio.AbortError:
                status = context.code().name if context.code() else "UNKNOWN"
                raise
            except Exception:
                status = "UNKNOWN"
                log.exception("%s request_id=%s failed unexpectedly", method, call.request_id)
                raise
            finally:
                seconds = time.monotonic() - started
                duration(status).observe(seconds)
                if self._call_observer:
                    self._call_observer(call, status)
                _log_call(call, status, level, seconds * 1000)

        # A stream's messages are parsed as they come; a unary body here, safely.
        deserializer = handler.request_deserializer if handler.request_streaming else parse
        return _rewrapped(handler, behavior, deserializer)


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses, with UNAUTHENTICATED, every call that lacks
    ``authorization: Bearer <token>`` for one of the accepted tokens,
    without so much as parsing its request.

    Several tokens are accepted at once so they can be rotated. Health checks
    need none: probes carry no credentials.
    """

    _EXEMPT_PREFIX = "/grpc.health.v1.Health/"

    def __init__(self, tokens):
        self._tokens = [token.encode() for token in tokens]
        self._refusals = _WrappedHandlers(self._refusal)

    def _authorized(self, metadata):
        header = dict(metadata or ()).get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer":
            return False
        matched = False
        for token in self._tokens:  # Every token is compared: constant time.
            matched |= hmac.compare_digest(given.encode(), token)
        return matched

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if (handler is None or handler_call_details.method.startswith(self._EXEMPT_PREFIX)
                or self._authorized(handler_call_details.invocation_metadata)):
            return handler
        return self._refusals.get(handler_call_details.method, handler)

    @staticmethod
    def _refusal(method, handler):
        async def refuse(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token")

        return _rewrapped(handler, refuse, None)


class Admission(grpc.aio.ServerInterceptor):
    """Bounds the ImageService calls in flight (GRPC_MAX_CONCURRENT_RPCS);
    past it, RESOURCE_EXHAUSTED at once. Health and reflection are never
    counted. A call leaves as soon as it ends, is cancelled or passes its
    deadline, even while its database thread finishes in the background.
    Knows what is in flight, so a shutdown can say what it abandoned."""

    def __init__(self, bound, gauge, service_name):
        self._bound = bound
        self._method_prefix = f"/{service_name}/"
        self._gauge = gauge
        self._in_flight = {}  # task -> Call
        self._idle = asyncio.Event()
        self._idle.set()
        self._wrapped = _WrappedHandlers(self._wrap)
        self.stopping = False

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or not handler_call_details.method.startswith(self._method_prefix):
            return handler
        return self._wrapped.get(handler_call_details.method, handler)

    def _wrap(self, method, handler):
        async def admitted(request, context):
            if len(self._in_flight) >= self._bound:
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                    f"server busy: {self._bound} deletes in flight; retry with backoff")
            task = asyncio.current_task()
            self._in_flight[task] = CURRENT_CALL.get()
            self._gauge.inc()
            self._idle.clear()
            try:
                return await _run_behavior(_behavior_of(handler), request, context)
            except asyncio.CancelledError:
                # After abandon_all (a second signal) the call is logged already.
                if self.stopping and task in self._in_flight:
                    self._log_abandoned(self._in_flight[task])
                raise
            finally:
                self._gauge.dec()
                self._in_flight.pop(task, None)
                if not self._in_flight:
                    self._idle.set()

        return _rewrapped(handler, admitted, handler.request_deserializer)

    async def wait_idle(self, timeout_s):
        """Until no ImageService call is in flight, or ``timeout_s`` passes."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout_s)

    def abandon_all(self):
        """Logs every call still in flight as abandoned (exiting now)."""
        for call in self._in_flight.values():
            self._log_abandoned(call)
        self._in_flight.clear()

    @staticmethod
    def _log_abandoned(call):
        log.warning("abandoned at shutdown: %s request_id=%s %s; safe to retry (files go before metadata)",
                    call.method, call.request_id, quoted_ids(call.model_ids))


# ---------------------------------------------------------------------------
# The kit: a method's handler, re-wrapped once with another behavior
# ---------------------------------------------------------------------------


class _WrappedHandlers:
    """An interceptor's wrapped handler for each method, built once: the
    handlers gRPC finds for a method stay the same from call to call."""

    def __init__(self, wrap):
        self._wrap = wrap
        self._by_method = {}

    def get(self, method, handler):
        inner, wrapped = self._by_method.get(method, (None, None))
        if inner is not handler:
            wrapped = self._wrap(method, handler)
            self._by_method[method] = (handler, wrapped)
        return wrapped


def _rewrapped(handler, behavior, request_deserializer):
    """A handler of the same streaming kind as ``handler``, with another
    behavior and request deserializer."""
    kind = ("unary_unary", "unary_stream", "stream_unary", "stream_stream")[
        2 * handler.request_streaming + handler.response_streaming]
    make = getattr(grpc, f"{kind}_rpc_method_handler")
    return make(behavior, request_deserializer=request_deserializer,
                response_serializer=handler.response_serializer)


def _behavior_of(handler):
    return (handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream)


async def _run_behavior(behavior, request, context):
    """Runs a handler's behavior, whether a coroutine or an async generator."""
    result = behavior(request, context)
    if inspect.isasyncgen(result):
        async for response in result:
            await context.write(response)
        return None
    return await result
