"""The server on an event loop of its own, in a thread, for synchronous code.

This module owns embedding: the tests, the benchmark and the load run call
the service from ordinary threads, while the server runs on asyncio. It
starts whatever server a coroutine builds (``image_service_server.
start_server``, say) on a loop in a daemon thread, runs coroutines there on
request, and drains and ends it. The loop is uvloop's, as the service's own
(which runs in the main thread and never uses this module).
"""

import asyncio
import threading

import uvloop


class BackgroundServer:
    """A started server on a loop of its own: ``running`` is what ``start``
    returned (it has ``port`` and ``stop(grace_s, delay_s)``)."""

    def __init__(self, start):
        self._loop = uvloop.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="grpc-loop", daemon=True)
        self._thread.start()
        self.running = self.run(start)
        self.port = self.running.port

    @property
    def stopped(self):
        """Whether the loop has ended (``stop`` drained the server)."""
        return not self._loop.is_running()

    def run(self, coroutine, timeout_s=None):
        """Runs a coroutine on the server's loop and returns its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout_s)

    def stop(self, grace_s=0.0, delay_s=0.0):
        """Drains as the process does at SIGTERM, then ends the loop; again: nothing."""
        if self._loop.is_running():
            self.run(self.running.stop(grace_s, delay_s))
            self.run(_cancel_the_rest())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            self._loop.close()  # its sockets and libuv handles now, not at garbage collection


async def _cancel_the_rest():
    """Cancels what still runs on the loop (a driver's monitors, say) and
    waits for it, as ``asyncio.run`` does before it closes its loop."""
    rest = asyncio.all_tasks() - {asyncio.current_task()}
    for task in rest:
        task.cancel()
    await asyncio.gather(*rest, return_exceptions=True)
