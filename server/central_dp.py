"""Central (site-level) differential privacy: Flower's DP-FedAvg wrappers around the
budget-aware FedAvg, and the ε they actually spend.

``central-dp``:
- ``none``: no wrapper (the sites' local user-level DP only);
- ``server-fixed``: :class:`DifferentialPrivacyServerSideFixedClipping` — the server
  clips each site's update (new − global) to L2 norm ``central-dp-clip`` and adds
  Gaussian noise to the mean;
- ``client-fixed``: :class:`DifferentialPrivacyClientSideFixedClipping` — the sites clip
  their own update (``fixedclipping_mod`` in the ClientApp, so the server never sees an
  unclipped update), the server adds the same noise.

The privacy unit here is the SITE (a site's whole update is in or out), not the user
of the local DP-SGD; the two compose as separate guarantees. Averaging is unweighted: with
weights, a large site's clipped update would move the mean by more than ``clip / m``.

Two things Flower's wrappers get wrong for fedenc, fixed here:
- the noise is calibrated to the number of updates actually averaged (m), not to the
  number of sites sampled (k): sites refuse, fail or are rejected, and the mean of m
  clipped updates moves by up to ``clip / m``; noise ``z·clip/k`` would then be an
  effective multiplier ``z·m/k``, smaller than claimed. Every noised round records the
  multiplier it applied (std × m / clip) and ε is computed from those records;
- sampling amplification is claimed only for secret sampling: with central DP the sites
  are drawn with ``secrets.SystemRandom`` (a seeded draw anyone can replay amplifies
  nothing), and each round is accounted at q = sampled / eligible sites (1 when all
  are sampled). Uniform sampling of a fixed number of sites is accounted as Poisson
  sampling at that rate, the usual DP-FedAvg approximation.

Accounting: Opacus' RDP accountant over the recorded rounds (Flower's own accountant
needs an unmodified ``FedAvg.aggregate_train``), reported at ``central-dp-delta``.
"""

from __future__ import annotations

import secrets

from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Strategy,
)
from flwr.serverapp.strategy.dp_fixed_clipping import compute_stdv

from common.config import Settings
from common.privacy import epsilon_spent

MODES = ("none", "server-fixed", "client-fixed")

Release = tuple[float, float]  # (noise multiplier applied, sampling rate) of one noised round


class _Accounted:
    """What both wrappers add: noise for the updates averaged, and a record of each round."""

    def _setup(self, releases: list[Release]) -> None:
        self.releases: list[Release] = list(releases)  # every noised round of the run, resumed ones included
        self._rate = 1.0

    def configure_train(self, server_round, arrays, config, grid):
        messages = list(super().configure_train(server_round, arrays, config, grid))
        roster = getattr(self.strategy, "roster", None)
        exhausted = roster.exhausted if roster is not None else set()
        eligible = [n for n in grid.get_node_ids() if n not in exhausted]
        self._rate = min(1.0, len(messages) / max(len(eligible), len(messages), 1))
        return messages

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        averaged = sum(1 for m in replies if not m.has_error())
        if averaged:
            self.num_sampled_clients = averaged  # the std Flower computes: z · clip / m
        return super().aggregate_train(server_round, replies)

    def _add_noise_to_aggregated_arrays(self, aggregated_arrays):
        std = compute_stdv(self.noise_multiplier, self.clipping_norm, self.num_sampled_clients)
        self.releases.append((std * self.num_sampled_clients / self.clipping_norm, self._rate))
        return super()._add_noise_to_aggregated_arrays(aggregated_arrays)


class ServerSideFixedClipping(_Accounted, DifferentialPrivacyServerSideFixedClipping):
    pass


class ClientSideFixedClipping(_Accounted, DifferentialPrivacyClientSideFixedClipping):
    pass


def wrap(strategy: Strategy, settings: Settings, releases: list[Release] = ()) -> Strategy:
    """The strategy the ServerApp starts: ``strategy`` itself, or wrapped for central DP
    (``releases``: the noised rounds of the run so far, when it resumes).

    Example::

        wrap(strategy, Settings.from_config({"central-dp": "server-fixed"})).releases  # []
    """
    mode = settings.server.central_dp
    if mode == "none":
        return strategy
    strategy.weighted_by_key = "unit-weight"  # every site weighs 1 (see module docstring)
    if hasattr(strategy, "_rng"):
        strategy._rng = secrets.SystemRandom()  # secret sampling, or no amplification may be claimed
    kind = ServerSideFixedClipping if mode == "server-fixed" else ClientSideFixedClipping
    wrapper = kind(strategy, settings.server.central_dp_noise, settings.server.central_dp_clip, max(1, settings.num_sites))
    wrapper._setup(releases)
    return wrapper


def central_epsilon(settings: Settings, releases: list[Release]) -> float:
    """Site-level ε of the noised rounds ``releases`` (0 when central DP is off).

    >>> s = Settings.from_config({"central-dp": "server-fixed"})
    >>> round(central_epsilon(s, [(1.0, 1.0)] * 5), 2)
    12.3
    """
    if settings.server.central_dp == "none" or not releases:
        return 0.0
    if any(z <= 0 for z, _ in releases):
        return float("inf")
    return epsilon_spent([(z, q, 1) for z, q in releases], settings.server.central_dp_delta, "rdp")
