"""Flower's grid with replies collected promptly.

Flower 1.42's ``Grid.send_and_receive`` looks for replies every 3 s, so every
round (and the prior's count query) waits 1.5 s on average after its last site has
answered; a default simulation (6 such exchanges) spends about 10 s just waiting,
the bare loop of ``fedenc bench`` none. The sites' replies are read the same way,
only more often.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message
from flwr.serverapp import Grid


class PromptGrid(Grid):
    """``grid``, with :meth:`send_and_receive` checking for replies every ``interval`` s.

    Example::

        grid = PromptGrid(grid)  # in the ServerApp's main, before any message is sent
    """

    def __init__(self, grid: Grid, interval: float = 0.25):
        self._grid, self.interval = grid, interval

    @property
    def run(self):
        return self._grid.run

    def set_run(self, run) -> None:
        self._grid.set_run(run)

    def create_message(self, *args, **kwargs) -> Message:
        return self._grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self._grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Push ``messages``, then collect replies until all came or ``timeout`` s passed
        (None: wait for all), as Flower's own does."""
        waiting = set(self.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while waiting and (deadline is None or time.monotonic() < deadline):
            found = list(self.pull_messages(waiting))
            replies += found
            waiting -= {m.metadata.reply_to_message_id for m in found}
            if waiting:
                time.sleep(self.interval)
        return replies
