"""A deployed site's resident worker: one long-lived process that keeps the imported
libraries and the opened :class:`common.site.Site` (data, model, derived rows) in memory
between Flower messages.

Flower starts a fresh ``flwr-clientapp`` process for every message; importing torch,
transformers, peft and opacus and opening the site again each time costs more than the
training itself. With a worker running, the ClientApp (``client.app``) only forwards the
message over a local channel and relays the reply; the worker runs the very same
``client.app.app`` (its mods and handlers: grant, catalogue check, ledger hold, kept
replies, training), so there is one code path for privacy, not two.

The channel is ``STATE_DIR/worker/socket``, a Unix socket in a folder of mode 0700, the
socket itself 0600, and every connection must prove it knows ``STATE_DIR/worker/authkey``
(32 random bytes written 0600 at each start; ``multiprocessing.connection``'s HMAC
challenge). Messages travel as Flower's own protobufs: nothing is unpickled.

Start it beside ``flower-supernode`` with the same node config (``fedenc deploy
supernode`` does)::

    python -m client.worker --node-config 'data-path="/srv/site.csv" site-id=0 ...'
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import AuthenticationError, Client, Connection, answer_challenge, deliver_challenge
from pathlib import Path

from flwr.app import Context, Message
from flwr.common.serde import context_from_proto, context_to_proto, message_from_proto, message_to_proto
from flwr.proto.message_pb2 import Context as ProtoContext, Message as ProtoMessage
from flwr.supercore.task_identity import TaskIdentity

from client.node import deployed_state_dir

_SERVING = threading.local()  # set on the thread that serves: its ClientApp must not forward again


class WorkerDied(RuntimeError):
    """The worker accepted a message and gave no reply (it may have spent budget on it)."""


@dataclass(frozen=True)
class Channel:
    """Where a site's worker listens and the key it expects.

    >>> Channel.of(Path("/srv/state")).socket
    PosixPath('/srv/state/worker/socket')
    """

    folder: Path

    @classmethod
    def of(cls, state_dir: Path) -> Channel:
        return cls(Path(state_dir) / "worker")

    @property
    def socket(self) -> Path:
        return self.folder / "socket"

    @property
    def authkey(self) -> Path:
        return self.folder / "authkey"


def serving_here() -> bool:
    """True inside the worker's handling of a message (the ClientApp then runs it in-process)."""
    return getattr(_SERVING, "on", False)


def forward(msg: Message, context: Context) -> Message | None:
    """Send ``msg`` to this site's worker and return its reply; None when no worker listens
    (no socket, nobody behind it, or no key to read), so the caller runs it in-process.

    Once the worker has accepted the message, a missing reply raises :class:`WorkerDied`
    instead of falling back: the worker may already have paid for it in the ledger, and a
    second, in-process attempt must not pay again unannounced (Flower records the site
    as failed for this message; the next one runs in-process or on a restarted worker).
    """
    state_dir = deployed_state_dir(context.node_config)
    if state_dir is None:
        return None
    channel = Channel.of(state_dir)
    try:
        key = channel.authkey.read_bytes()
        conn = Client(str(channel.socket), family="AF_UNIX", authkey=key)
    except (OSError, EOFError, AuthenticationError):  # no worker, a stale socket, or a key from another start
        return None
    identity = {"run": TaskIdentity.run_id, "node": TaskIdentity.node_id, "task": TaskIdentity.task_id}
    with conn:
        try:
            conn.send_bytes(json.dumps(identity).encode())
            conn.send_bytes(message_to_proto(msg).SerializeToString())
            conn.send_bytes(context_to_proto(context).SerializeToString())
            status = json.loads(conn.recv_bytes())
            if status.get("error"):
                raise RuntimeError(f"site worker: {status['error']}")
            reply = ProtoMessage.FromString(conn.recv_bytes())
            state = ProtoContext.FromString(conn.recv_bytes())
        except (OSError, EOFError) as err:
            raise WorkerDied(f"the site's worker ({channel.socket}) stopped while serving this message ({err!r}); "
                             "not run again in-process, it may already be recorded in the ledger") from None
    context.state = context_from_proto(state).state
    return message_from_proto(reply)


class Worker:
    """Serves one message at a time on the site's channel (the ledger's flock orders it
    with any in-process ClientApp). ``served`` counts the messages answered."""

    def __init__(self, node_config: dict):
        state_dir = deployed_state_dir(node_config)
        if state_dir is None:
            raise ValueError("a site worker serves a deployed site: its node config needs data-path")
        self.node_config = dict(node_config)
        self.channel = Channel.of(state_dir)
        self.served = 0
        self._key = b""
        self._socket: socket.socket | None = None

    def open(self) -> Worker:
        """Create the folder (0700), a fresh key (0600) and the socket (0600)."""
        folder = self.channel.folder
        folder.mkdir(parents=True, exist_ok=True)
        folder.chmod(0o700)
        if self.channel.socket.exists():
            with socket.socket(socket.AF_UNIX) as probe, contextlib.suppress(OSError):
                probe.connect(str(self.channel.socket))
                raise RuntimeError(f"another worker already serves this site at {self.channel.socket}")
            self.channel.socket.unlink()  # left by a worker that died
        key = os.urandom(32)
        fresh = folder / "authkey.new"
        fresh.unlink(missing_ok=True)
        fd = os.open(fresh, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key)
        os.replace(fresh, self.channel.authkey)
        old = os.umask(0o177)  # the socket is born 0600: no window where another user could connect
        try:
            listening = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listening.bind(str(self.channel.socket))
        finally:
            os.umask(old)
        listening.listen()
        listening.settimeout(0.5)  # accept() wakes up to see a stop request
        self._key, self._socket = key, listening
        return self

    def close(self) -> None:
        """Remove the socket and the key (only this worker's: nothing when it never opened)."""
        if self._socket is not None:
            self._socket.close()
            self._socket = None
            self.channel.socket.unlink(missing_ok=True)
            self.channel.authkey.unlink(missing_ok=True)

    def serve_one(self) -> None:
        """Wait up to half a second for a connection and answer its message; a peer without
        the key is dropped after the HMAC challenge, before it can send anything."""
        try:
            raw, _ = self._socket.accept()
        except TimeoutError:
            return
        raw.setblocking(True)
        with Connection(raw.detach()) as conn:
            try:
                deliver_challenge(conn, self._key)
                answer_challenge(conn, self._key)
            except (AuthenticationError, EOFError, OSError) as err:
                print(f"site worker: refused a connection ({err})", file=sys.stderr, flush=True)
                return
            from deploy.processes import uninterrupted

            with uninterrupted():  # a SIGTERM waits for the reply: a message half done may be half paid
                try:
                    self._answer(conn)
                except OSError as err:  # the ClientApp left (Flower ended it) before the reply
                    print(f"site worker: could not reply ({err!r})", file=sys.stderr, flush=True)

    def serve_forever(self, stop: threading.Event | None = None) -> None:
        """Serve until ``stop`` is set (or, without one, until the process is stopped)."""
        while stop is None or not stop.is_set():
            self.serve_one()

    def _answer(self, conn: Connection) -> None:
        from client.app import app

        try:
            identity = json.loads(conn.recv_bytes())
            msg_proto = ProtoMessage.FromString(conn.recv_bytes())
            context = context_from_proto(ProtoContext.FromString(conn.recv_bytes()))
        except (OSError, EOFError, ValueError) as err:
            print(f"site worker: dropped a malformed request ({err!r})", file=sys.stderr, flush=True)
            return
        if dict(context.node_config) != self.node_config:  # a SuperNode restarted with other settings
            conn.send_bytes(json.dumps({"error": "this worker was started with another node config; restart it "
                                                 "with the SuperNode's (fedenc deploy supernode does)"}).encode())
            return
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = identity["run"], identity["node"], identity["task"]
        _SERVING.on = True
        began = time.perf_counter()
        try:
            reply = app(message_from_proto(msg_proto), context)
        except Exception as err:  # as Flower would: the message fails with the reason, the worker lives on
            conn.send_bytes(json.dumps({"error": f"{type(err).__name__}: {err}"}).encode())
            return
        finally:
            _SERVING.on = False
        self.served += 1  # before the reply leaves: whoever reads the reply sees the count
        print(f"site worker: {msg_proto.metadata.message_type} answered in {time.perf_counter() - began:.1f}s",
              file=sys.stderr, flush=True)
        conn.send_bytes(b"{}")
        conn.send_bytes(message_to_proto(reply).SerializeToString())
        conn.send_bytes(context_to_proto(context).SerializeToString())


def main(argv: list[str] | None = None) -> int:
    """``python -m client.worker --node-config '...'``: serve until SIGTERM or Ctrl-C."""
    from flwr.common.config import parse_config_args

    from client.node import NodeConfig, NodeConfigError
    from deploy.processes import Interrupted, interrupt_on_signals

    parser = argparse.ArgumentParser(prog="python -m client.worker", description=__doc__.split("\n\n")[0])
    parser.add_argument("--node-config", required=True, help="the SuperNode's --node-config string")
    args = parser.parse_args(argv)
    try:
        node_config = parse_config_args([args.node_config])
        NodeConfig.parse(node_config)
        worker = Worker(node_config)
    except (NodeConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    import client.app

    client.app.preload()  # the libraries a message needs, imported once
    try:
        with interrupt_on_signals():
            worker.open()
            print(f"site worker: serving {worker.channel.socket}", file=sys.stderr, flush=True)
            worker.serve_forever()
    except Interrupted as stop:
        return stop.exit_code
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        worker.close()
    return 0


if __name__ == "__main__":
    # Serve from the module client.app imports, not from this __main__ copy: the ClientApp's
    # mod asks client.worker whether it runs inside the worker (here it must not forward).
    from client import worker

    sys.exit(worker.main())
