"""Central (site-level) differential privacy: Flower's DP-FedAvg wrappers around the
budget-aware FedAvg, and the ε they spend.

``central-dp``:
- ``none``: no wrapper (the sites' local user-level DP only);
- ``server-fixed``: :class:`DifferentialPrivacyServerSideFixedClipping` — the server
  clips each site's update (new − global) to L2 norm ``central-dp-clip`` and adds
  Gaussian noise of std ``central-dp-noise × clip / sampled sites`` to the mean;
- ``client-fixed``: :class:`DifferentialPrivacyClientSideFixedClipping` — the sites clip
  their own update (``fixedclipping_mod`` in the ClientApp, so the server never sees an
  unclipped update), the server adds the same noise.

The privacy unit here is the SITE (a site's whole update is in or out), not the user
of the local DP-SGD; the two compose as separate guarantees. Averaging is unweighted in
this mode: with weights, a large site's clipped update would move the mean by more than
``clip / sampled`` and the noise would not cover it.

Accounting. Flower's own accountant (``accountant=`` of the wrappers, RDP through the
``dp-accounting`` package of ``flwr[dp]``) accepts only an unmodified
``FedAvg.aggregate_train`` and equal weights, and only "no-amplification" sampling; our
strategy overrides ``aggregate_train`` (budget-aware exclusions), so we compute the
same quantity with Opacus' RDP accountant (installed for local DP): one sampled
Gaussian mechanism per round with noise multiplier ``central-dp-noise`` and sampling
rate q = sampled sites / all sites. Assumption: q < 1 treats the server's uniform
sampling of a fixed number of sites as Poisson sampling at rate q (the usual DP-FedAvg
approximation); with ``fraction-train = 1`` (q = 1) there is no amplification and the ε is
exact for the Gaussian mechanism. ε is reported at ``central-dp-delta``.
"""

from __future__ import annotations

from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Strategy,
)

from common.config import Settings
from common.privacy import epsilon_spent

MODES = ("none", "server-fixed", "client-fixed")


def sampled_sites(settings: Settings) -> int:
    return max(1, round(settings.num_sites * settings["fraction-train"]))


def wrap(strategy: Strategy, settings: Settings) -> Strategy:
    """The strategy the ServerApp starts: ``strategy`` itself, or wrapped for central DP."""
    mode = settings["central-dp"]
    if mode == "none":
        return strategy
    strategy.weighted_by_key = "unit-weight"  # every site weighs 1 (see module docstring)
    wrapper = DifferentialPrivacyServerSideFixedClipping if mode == "server-fixed" else DifferentialPrivacyClientSideFixedClipping
    return wrapper(strategy, settings["central-dp-noise"], settings["central-dp-clip"], sampled_sites(settings))


def central_epsilon(settings: Settings, rounds: int) -> float:
    """Site-level ε after ``rounds`` noised aggregations (0 when central DP is off)."""
    if settings["central-dp"] == "none" or rounds <= 0:
        return 0.0
    noise = settings["central-dp-noise"]
    if noise <= 0:
        return float("inf")
    q = sampled_sites(settings) / settings.num_sites
    return epsilon_spent([(noise, q, rounds)], settings["central-dp-delta"], "rdp")
