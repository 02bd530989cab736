"""The server on an event loop of its own, in a thread, for synchronous code.

This module owns embedding: the tests, the benchmark and the load run call
the service from ordinary threads, while the server runs on asyncio. It
starts whatever server a coroutine builds (``image_service_server.
start_server``, say) on a loop in a daemon thread, runs coroutines there on
request, and drains and ends it. The service itself never uses it: it runs
on ``asyncio.run`` in the main thread.
"""

import asyncio
import threading


class BackgroundServer:
    """A started server on a loop of its own: ``running`` is what ``start``
    returned (it has ``port`` and ``stop(grace_s, delay_s)``)."""

    def __init__(self, start):
        self._loop = asyncio.new_event_loop()
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
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
