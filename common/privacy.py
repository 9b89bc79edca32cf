"""User-level differential privacy: accounting, calibration and the site's policy.

Pure functions over Opacus' accountants (a history of ``(noise_multiplier,
sample_rate, steps)`` entries); what a run asks for (:class:`PrivacySettings`) and what
a site allows (:class:`SitePolicy`, from the site's own configuration). What a site has
spent lives in its ledger (:mod:`common.ledger`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

from opacus.accountants import RDPAccountant, create_accountant
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

from .settings import PrivacyError, PrivacySettings, site_delta

History = list[tuple[float, float, int]]  # (noise_multiplier, sample_rate, steps)


class BudgetExhausted(RuntimeError):
    """The next round would push the site past its ε budget."""


class PolicyRefused(PrivacyError):
    """The run asks for more than the site's policy allows (e.g. no DP at a DP-only site)."""


class TooFewUsers(PrivacyError):
    """The site has fewer users than one expected DP batch: it sits out DP training
    (its update would be noise), but still belongs to the federation."""


def epsilon_spent(history: History, delta: float, accountant: str = "rdp") -> float:
    """ε of a composed history of DP-SGD steps.

    >>> round(epsilon_spent([(1.0, 0.01, 1000)], 1e-5), 2)
    2.1
    """
    if not history:
        return 0.0
    if accountant == "rdp":
        # What RDPAccountant.get_epsilon computes, bit for bit (compute_rdp(steps=n) is the
        # one-step vector times n), with the one-step vector cached per (σ, q): calibration
        # and every ledger check reuse it instead of re-deriving 150 orders each time.
        rdp = sum(_rdp_one_step(float(s), float(q)) * int(n) for s, q, n in history)
        eps, _ = get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta)
        return float(eps)
    acc = create_accountant(accountant)
    acc.history = [(float(s), float(q), int(n)) for s, q, n in history]
    return float(acc.get_epsilon(delta=delta))


@functools.lru_cache(maxsize=4096)
def _rdp_one_step(noise_multiplier: float, sample_rate: float):
    rdp = compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=RDPAccountant.DEFAULT_ALPHAS)
    rdp.setflags(write=False)  # shared by the cache
    return rdp


def calibrate_noise(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    prior: History = (),
    accountant: str = "rdp",
    tolerance: float = 0.01,
) -> float:
    """Smallest noise multiplier (within ``tolerance`` in ε) such that ``prior`` plus ``steps``
    Poisson-sampled steps at ``sample_rate`` stays at or below ``target_epsilon``.

    >>> s = calibrate_noise(8.0, 1e-5, 0.05, 100)
    >>> epsilon_spent([(s, 0.05, 100)], 1e-5) <= 8.0
    True
    """
    prior = list(prior)
    if epsilon_spent(prior, delta, accountant) >= target_epsilon:
        raise BudgetExhausted(f"the budget ε={target_epsilon} is already spent")

    def eps(sigma: float) -> float:
        return epsilon_spent(prior + [(sigma, sample_rate, steps)], delta, accountant)

    low, high = 0.0, 1.0
    eps_high = eps(high)  # each ε evaluation is the expensive part: never compute one twice
    while eps_high > target_epsilon:
        low, high = high, 2 * high
        if high > 1e4:
            raise PrivacyError(f"no noise level reaches ε={target_epsilon} with {steps} steps at rate {sample_rate}")
        eps_high = eps(high)
    while target_epsilon - eps_high >= tolerance and high - low >= 1e-6:
        mid = (low + high) / 2
        eps_mid = eps(mid)
        if eps_mid > target_epsilon:
            low = mid
        else:
            high, eps_high = mid, eps_mid
    return high


@dataclass(frozen=True)
class SitePolicy:
    """What a site allows its users' data to be used for, from the site's own configuration
    (node config in deployment; the run config plays the site in simulation).

    A run's privacy settings are a request: :meth:`grant` can only tighten them.

    >>> policy = SitePolicy(budget=8.0)
    >>> policy.grant(PrivacySettings(epsilon=100.0, delta=0.5), num_users=943).epsilon
    8.0
    """

    budget: float  # the most ε the site's ledger may ever hold
    delta: float | None = None  # a cap on δ; None: site_delta(n)
    allow_non_private: bool = False  # serve runs that ask for no DP (exact releases)

    def __post_init__(self):
        if not self.budget > 0:
            raise PrivacyError(f"epsilon-budget must be > 0, got {self.budget}")
        if self.delta is not None and not 0 < self.delta < 1:
            raise PrivacyError(f"delta must be in (0, 1), got {self.delta}")

    def grant(self, request: PrivacySettings, num_users: int) -> PrivacySettings:
        """The privacy a run gets at this site: the tighter of the request and the policy.

        Raises :class:`PolicyRefused` when the run asks for no DP and the site does not allow it.
        """
        if not request.private or not request.noise:  # no DP, or DP-SGD without noise (the audit's control)
            if not self.allow_non_private:
                raise PolicyRefused("the run asks for no differential privacy; this site's policy requires it "
                                    "(allow-non-private = false)")
            return request
        deltas = [d for d in (request.delta, self.delta) if d is not None] + [site_delta(num_users)]
        return replace(request, epsilon=min(request.epsilon, self.budget), delta=min(deltas))
