"""How delete calls take turns at the database, and share them under load.

This module owns the line of calls waiting to delete: who starts when, and
who goes together. Two turns gather calls at once (GATHERING_TURNS); when
one ends, every call then waiting that may join (``may_join``) starts with
the first in line, as one turn. One caller alone waits for nothing; under
load a turn carries several calls, and MongoDB's work and the service's
grow more slowly than the calls. A turn that turns out large calls
``stop_gathering`` and no longer holds up the next. It knows nothing of
MongoDB: the servicer hands it the coroutine that deletes one turn's calls.
"""

import asyncio
import collections
import dataclasses
import time

# Turns that gather waiting calls at once. Fewer, larger turns cost less
# per model, on the server and on MongoDB; with one, a single slow turn
# would stop every delete. Two keep half the service moving, for 10-30% of
# throughput against one (measured with 1, 2, 3, 4 and 10:
# docs/performance.md).
GATHERING_TURNS = 2


@dataclasses.dataclass(eq=False)
class WaitingCall:
    """A call's deletion, waiting for its turn. ``call`` has ``valid``, the
    model ids it deletes; ``replies`` is resolved with its answer."""

    call: object
    deadline: float  # on time.monotonic()
    dry_run: bool
    replies: asyncio.Future


def may_join(group, models, waiting, now, max_models):
    """Whether a waiting call may be deleted with ``group`` (the calls
    gathered so far, holding ``models``), at ``now`` (on
    ``time.monotonic()``): none is a dry run, the call waits on no model of
    the group, the group stays within ``max_models``, and the turn's
    deadline (its calls' earliest) leaves each of them at least nine tenths
    of its own budget, so no call is cut short for another's sake."""
    joining = set(waiting.call.valid)
    deadlines = [member.deadline for member in group] + [waiting.deadline]
    return (not (group[0].dry_run or waiting.dry_run or waiting.replies.done())
            and not joining & models and len(models) + len(joining) <= max_models
            and min(deadlines) - now >= 0.9 * (max(deadlines) - now))


class Turns:
    """The line of waiting calls and the turns running. ``take_turn(group,
    deadline, stop_gathering)`` deletes a group's calls by ``deadline`` (its
    calls' earliest) and answers each; at most ``max_running`` turns run at
    once, of which GATHERING_TURNS gather calls, each up to ``max_models``
    models."""

    def __init__(self, take_turn, max_running, max_models):
        self._take_turn = take_turn
        self._max_running = max_running
        self._max_models = max_models
        self._waiting = collections.deque()
        self._running = 0
        self._gathering = 0
        self.unfinished = set()  # calls waiting and turns running, their callers gone or not

    def wait_for_turn(self, waiting):
        """Puts a call in line; its ``replies`` tell when its turn has answered it."""
        self._waiting.append(waiting)
        self.unfinished.add(waiting.replies)
        waiting.replies.add_done_callback(self.unfinished.discard)
        self._start_turns()

    def _start_turns(self):
        while self._gathering < GATHERING_TURNS and self._running < self._max_running:
            while self._waiting and self._waiting[0].replies.done():  # abandoned by the drain
                self._waiting.popleft()
            if not self._waiting:
                return
            self._start(self._next_group())

    def _next_group(self):
        """The first waiting call, and those that may join it."""
        first, now = self._waiting.popleft(), time.monotonic()
        group, models, left = [first], set(first.call.valid), collections.deque()
        while self._waiting:
            waiting = self._waiting.popleft()
            if may_join(group, models, waiting, now, self._max_models):
                group.append(waiting)
                models.update(waiting.call.valid)
            else:
                left.append(waiting)
        self._waiting = left
        return group

    def _start(self, group):
        gathering = not group[0].dry_run  # a dry run's turn gathers nobody
        self._running += 1
        self._gathering += gathering

        def stop_gathering():  # once the turn turns out large, or ends
            nonlocal gathering
            if gathering:
                gathering = False
                self._gathering -= 1
                self._start_turns()

        def ended(turn):
            # Also when the drain cancels the turn before its first step.
            error = None if turn.cancelled() else turn.exception()
            for waiting in group:
                if waiting.replies.done():
                    continue
                if turn.cancelled():
                    waiting.replies.cancel()
                else:  # a bug: each caller gets it, as from a deletion of its own
                    waiting.replies.set_exception(error or RuntimeError("the turn answered nobody"))
            self._running -= 1
            stop_gathering()
            self._start_turns()

        deadline = min(waiting.deadline for waiting in group)
        turn = asyncio.ensure_future(self._take_turn(group, deadline, stop_gathering))
        self.unfinished.add(turn)
        turn.add_done_callback(self.unfinished.discard)
        turn.add_done_callback(ended)
