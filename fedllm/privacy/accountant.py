"""How much privacy a DP-FedAvg federation has spent: Google's ``dp-accounting`` (RDP), never a formula of ours.

Each round is one sampled Gaussian mechanism over the clients, composed T times:

* ``--client_sampling uniform`` draws exactly m of the N clients without replacement. That is what the
  accountant's ``SampledWithoutReplacementDpEvent`` analyses (Wang, Balle, Kasiviswanathan 2019), under the
  *replace-one* neighbouring relation (N is public): one client's clipped update replaced by any other moves
  the sum by up to 2C, so the Gaussian's noise multiplier relative to that sensitivity is σ/2.
* ``--client_sampling poisson`` includes each client independently with probability q = m/N:
  ``PoissonSampledDpEvent`` under add/remove-one, sensitivity C, noise multiplier σ -- the classical
  analysis of DP-FedAvg (McMahan et al. 2018).

The seeded uniform draw is deterministic given the seed, which the server keeps secret (``/v1/config``
serves it as null to clients); the guarantee is against everyone who does not hold the server's state.
"""

from __future__ import annotations

import functools
import logging

from dp_accounting import dp_event
from dp_accounting.privacy_accountant import NeighboringRelation
from dp_accounting.rdp import rdp_privacy_accountant

# dp-accounting warns for every RDP order whose series does not converge (it then excludes that order).
logging.getLogger("absl").setLevel(logging.ERROR)


class ClientLevelAccountant:
    """ε(T) at δ for T rounds of DP-FedAvg with noise multiplier σ over N clients, m per round."""

    def __init__(self, num_clients: int, sample_clients: int, noise_multiplier: float, delta: float,
                 sampling: str = "uniform"):
        self.num_clients = num_clients
        self.sample_clients = sample_clients
        self.noise_multiplier = noise_multiplier
        self.delta = delta
        self.sampling = sampling

    def round_event(self) -> dp_event.DpEvent:
        """One round as the accountant sees it."""
        if self.sampling == "poisson":
            return dp_event.PoissonSampledDpEvent(self.sample_clients / self.num_clients,
                                                  dp_event.GaussianDpEvent(self.noise_multiplier))
        return dp_event.SampledWithoutReplacementDpEvent(self.num_clients, self.sample_clients,
                                                         dp_event.GaussianDpEvent(self.noise_multiplier / 2))

    def neighboring_relation(self) -> NeighboringRelation:
        return (NeighboringRelation.ADD_OR_REMOVE_ONE if self.sampling == "poisson"
                else NeighboringRelation.REPLACE_ONE)

    @functools.lru_cache(maxsize=256)  # noqa: B019  (one accountant per federation, few distinct T)
    def epsilon(self, rounds: int) -> float | None:
        """ε spent after ``rounds`` rounds: 0 before the first, None without noise (no guarantee at all)."""
        if self.noise_multiplier <= 0:
            return None
        if rounds <= 0:
            return 0.0
        accountant = rdp_privacy_accountant.RdpAccountant(neighboring_relation=self.neighboring_relation())
        accountant.compose(self.round_event(), rounds)
        return float(accountant.get_epsilon(self.delta))

    def rounds_allowed(self, target_epsilon: float | None, max_rounds: int) -> int:
        """The most rounds (up to ``max_rounds``) whose ε stays within ``target_epsilon``; ε grows with T."""
        if target_epsilon is None or self.noise_multiplier <= 0:
            return max_rounds if target_epsilon is None else 0
        low, high = 0, max_rounds
        while low < high:  # the largest T in [0, max_rounds] with ε(T) <= target
            middle = (low + high + 1) // 2
            if self.epsilon(middle) <= target_epsilon:
                low = middle
            else:
                high = middle - 1
        return low


def accountant_for(config) -> ClientLevelAccountant:
    """The accountant of a federation's settings (a ``FederationArguments`` with ``--dp`` on)."""
    return ClientLevelAccountant(config.num_clients, config.sample_clients, config.dp_noise_multiplier,
                                 config.effective_delta(), config.client_sampling)
