"""Deployment tooling: run fedenc across partner sites on a real Flower SuperLink.

What each machine runs (the README's "Deploy across sites" has the exact commands):

- the operator (server machine): ``fedenc deploy certs`` (a CA and the SuperLink's TLS
  certificate), ``fedenc deploy superlink`` (``flower-superlink`` with TLS and
  ``--enable-supernode-auth``), ``fedenc deploy connection`` + ``fedenc deploy register``
  (each site's public key), then ``fedenc deploy run`` (``flwr run . <connection>``,
  in the foreground, non-zero exit unless the ServerApp wrote its summary);
- each site: ``fedenc deploy keys`` (its node-auth key pair; only the ``.pub`` file
  leaves the site), ``fedenc deploy supernode`` (``flower-supernode`` over TLS with the
  site's own ``data-path``/``site-id``/``ledger-path`` node config).

Nothing here transports or aggregates anything itself: these are Flower's own
processes, started with checked inputs, time-outs and runtime dependency installs off.
Every sub-command has ``--print`` to show the command instead of running it.
"""


class DeployError(RuntimeError):
    """A deployment input or step failed; the message names the file, address or step."""
