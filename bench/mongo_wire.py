"""The MongoDB wire protocol, as much of it as a stand-in needs to answer the
real pymongo driver over TCP: the legacy handshake (OP_QUERY, answered with
OP_REPLY), every other command (OP_MSG: a body section and, for inserts and
deletes, document sequences), the handshake's reply document, and a server
that hands each decoded command to a stand-in's ``answer`` and sends back
what it returns, at once or after a fixed latency.

The stand-ins that speak it decide what a database holds; this module only
carries their answers. The benchmark's stand-in (``bench/mongo_standin.py``)
and the tests' SyntheticMongo (``tests/mongo_standins.py``) both serve
through it. It lives in ``bench/`` because the tests already import this
package (the load run) and the benchmark never imports the tests: the
dependency points one way, tests to bench to the service, and this module
imports neither.
"""

import asyncio
import struct

import bson
from bson import Int64

OP_REPLY, OP_QUERY, OP_MSG = 1, 2004, 2013
HEADER = struct.Struct("<iiii")  # message length, request id, the request it answers, opcode

# A standalone primary. Without logicalSessionTimeoutMinutes the driver
# sends no sessions; a stand-in that offers them adds it.
HELLO = {"ismaster": True, "isWritablePrimary": True, "helloOk": True, "minWireVersion": 0,
         "maxWireVersion": 21, "maxBsonObjectSize": 16 * 1024 * 1024, "maxMessageSizeBytes": 48_000_000,
         "maxWriteBatchSize": 100_000, "ok": 1}


def cursor(namespace, documents):
    """The reply to a read: all of ``documents`` in its first batch, no cursor left open."""
    return {"cursor": {"id": Int64(0), "ns": namespace, "firstBatch": documents}, "ok": 1}


def command_of(opcode, body):
    """The command a request message carries, from its body (the message
    after its header)."""
    if opcode == OP_QUERY:  # flags, collection name, skip, limit, then the command
        return bson.decode(body[body.index(b"\0", 4) + 9:])
    return _op_msg_command(body)


def _op_msg_command(body):
    """An OP_MSG's command: its body section, with any document sequence
    (inserts, deletes) added under its identifier."""
    command, offset = {}, 4  # after the flag bits
    while offset < len(body):
        kind, offset = body[offset], offset + 1
        size = struct.unpack_from("<i", body, offset)[0]
        if kind == 0:
            command.update(bson.decode(body[offset:offset + size]))
        else:
            name_end = body.index(b"\0", offset + 4)
            command[body[offset + 4:name_end].decode()] = bson.decode_all(body[name_end + 1:offset + size])
        offset += size
    return command


def reply_message(opcode, request_id, document):
    """The whole message answering request ``request_id`` with ``document``:
    OP_REPLY to an OP_QUERY, OP_MSG to an OP_MSG."""
    if opcode == OP_QUERY:  # flags, cursor id, starting from, one document
        message, opcode_out = struct.pack("<iqii", 0, 0, 0, 1) + bson.encode(document), OP_REPLY
    else:  # no flag bits, one body section
        message, opcode_out = b"\0\0\0\0\0" + bson.encode(document), OP_MSG
    return HEADER.pack(HEADER.size + len(message), 0, request_id, opcode_out) + message


class _Connection(asyncio.Protocol):
    """One driver connection: each complete message answered as it arrives."""

    def __init__(self, answer, latency_s):
        self._answer = answer
        self._latency_s = latency_s
        self._buffer = bytearray()
        self._transport = None

    def connection_made(self, transport):
        self._transport = transport

    def data_received(self, data):
        self._buffer += data
        while len(self._buffer) >= HEADER.size:
            length, request_id, _, opcode = HEADER.unpack_from(self._buffer)
            if len(self._buffer) < length:
                return
            body = bytes(self._buffer[HEADER.size:length])
            del self._buffer[:length]
            document = self._answer(command_of(opcode, body), len(body))
            self._send(reply_message(opcode, request_id, document))

    def _send(self, reply):
        if self._latency_s:
            asyncio.get_running_loop().call_later(self._latency_s, self._write, reply)
        else:
            self._write(reply)

    def _write(self, reply):
        if not self._transport.is_closing():
            self._transport.write(reply)


async def serve(answer, port=0, latency_s=0.0, on_listening=None):
    """Serves on 127.0.0.1 until cancelled. ``answer(command, size)`` gives
    the reply document to each command, ``size`` being its message's body in
    bytes; ``latency_s`` is added before every reply; ``on_listening`` is
    called with the bound port."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Connection(answer, latency_s), "127.0.0.1", port, backlog=512)
    if on_listening is not None:
        on_listening(server.sockets[0].getsockname()[1])
    async with server:
        await server.serve_forever()
