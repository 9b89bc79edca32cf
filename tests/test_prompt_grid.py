"""The ServerApp's grid collects the sites' replies as soon as they are there, all of them,
and gives up at the timeout like Flower's own."""

import time
from types import SimpleNamespace

from server.grid import PromptGrid


class SlowSites:
    """Replies to message i become available ``delays[i]`` seconds after the push."""

    def __init__(self, delays):
        self.delays, self.pulls = delays, 0

    def push_messages(self, messages):
        self.pushed = time.monotonic()
        return [f"m{i}" for i, _ in enumerate(messages)]

    def pull_messages(self, ids):
        self.pulls += 1
        now = time.monotonic() - self.pushed
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=i)) for i in sorted(ids)
                if now >= self.delays[int(i[1:])]]


def test_replies_are_collected_promptly_and_completely():
    sites = SlowSites([0.0, 0.3, 0.5])
    start = time.monotonic()
    replies = PromptGrid(sites, interval=0.05).send_and_receive(["a", "b", "c"], timeout=None)
    took = time.monotonic() - start
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["m0", "m1", "m2"]  # each once
    assert 0.5 <= took < 1.5  # Flower's own polls every 3 s: it would return after 3 s
    assert sites.pulls >= 3


def test_a_site_that_never_answers_is_left_at_the_timeout():
    sites = SlowSites([0.0, 60.0])
    start = time.monotonic()
    replies = PromptGrid(sites, interval=0.05).send_and_receive(["a", "b"], timeout=0.4)
    assert [r.metadata.reply_to_message_id for r in replies] == ["m0"]
    assert 0.4 <= time.monotonic() - start < 2.0
