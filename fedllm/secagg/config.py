"""The federation's secure-aggregation options (``--secure_aggregation`` ...): identity, served to clients.

No torch here: :mod:`fedllm.config` imports this to build :class:`~fedllm.config.FederationArguments`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..algorithms.base_config import range_problem

SECAGG_MODES = ("off", "secagg+")
# Algorithms whose server step needs only the (weighted) mean delta, which is what the secure sum gives, and
# SCAFFOLD, whose control-variate deltas are summed securely too (unweighted: fedllm.secagg.encoding).
SECAGG_COMPATIBLE = ("fedavg", "fedprox", "fedavgm", "fedadagrad", "fedyogi", "fedadam", "scaffold")


@dataclass
class SecAggArguments:
    """Secure aggregation: the server learns only the sum of the round's updates (docs/secure_aggregation.md)."""

    secure_aggregation: str = field(
        default="off",
        metadata={"help": "'secagg+': clients mask their (clipped, weight-premultiplied, fixed-point) updates "
                          "with pairwise and self masks (SecAgg+, Bell et al. 2020) and the server unmasks only "
                          "the sum, tolerating dropouts down to --secagg_threshold; or off.",
                  "choices": list(SECAGG_MODES)},
    )
    secagg_threshold: float = field(
        default=0.5,
        metadata={"help": "Shamir threshold t: a fraction f in (0, 1) (more than f of each client's share holders, "
                          "itself and its neighbours: t = max(2, floor(f·|H|) + 1)) or a count ≥ 2. A round needs "
                          "t of each neighbourhood to answer the unmasking stage; the server plus t-1 colluding "
                          "clients learn nothing beyond the sum."},
    )
    secagg_neighbours: int = field(
        default=0,
        metadata={"help": "k of SecAgg+'s k-regular neighbour graph (each client masks with and shares among k "
                          "others); 0 = auto: all others up to 10 clients per round, then 2·ceil(2·log2 n)."},
    )
    secagg_bits: int = field(
        default=32,
        metadata={"help": "The ring Z_{2^bits} of the fixed-point encoding (8-62; ≤ 32 travels as uint32). With "
                          "--secagg_clip c the mean's rounding error is ≤ m·c / (2^(bits-2)·P - m/2) per coordinate "
                          "(m answering clients holding weight fraction P): ≤ 1e-6 for m/P ≤ 1073 at the defaults."},
    )
    secagg_clip: float = field(
        default=1.0,
        metadata={"help": "The per-coordinate range [-c, c] of the fixed-point encoding; a delta coordinate outside "
                          "it is clipped to it (the client logs how many)."},
    )

    @property
    def secagg_enabled(self) -> bool:
        return self.secure_aggregation != "off"

    def secagg_problems(self: Any) -> list[str]:
        """What is wrong with the secure-aggregation options, given the rest of the federation."""
        if not self.secagg_enabled:
            return []
        problems = [p for p in [
            range_problem("secagg_bits", self.secagg_bits, at_least=8, at_most=62),
            range_problem("secagg_clip", self.secagg_clip, above=0),
            range_problem("secagg_neighbours", self.secagg_neighbours, at_least=0),
            range_problem("secagg_threshold", self.secagg_threshold, above=0),
        ] if p]
        if 1 <= self.secagg_threshold and (self.secagg_threshold < 2 or not float(self.secagg_threshold).is_integer()):
            problems.append(f"--secagg_threshold must be a fraction in (0, 1) or a whole count ≥ 2, got "
                            f"{self.secagg_threshold:g}")
        if self.sample_clients < 3 and self.client_sampling == "uniform":
            problems.append(f"--secure_aggregation needs at least 3 clients per round (--sample_clients "
                            f"{self.sample_clients}): with 2, each learns the other's update from the sum")
        if self.fed_alg not in SECAGG_COMPATIBLE:
            problems.append(f"--secure_aggregation with --fed_alg {self.fed_alg} is refused: the server learns only "
                            f"the sum, which only {', '.join(SECAGG_COMPATIBLE)} aggregate; robust rules (median, "
                            "trimmed mean, Krum) need the individual updates")
        if self.dp == "server":
            problems.append("--dp server with --secure_aggregation: the server cannot clip updates it never sees; "
                            "use --dp client (clients clip, the server noises the secure mean)")
        if self.dp == "client" and self.adaptive_clipping:
            problems.append("--dp_clip_norm auto with --secure_aggregation: adaptive clipping needs each client's "
                            "clipped bit in the clear; use a fixed --dp_clip_norm")
        if self.max_update_norm > 0:
            problems.append("--max_update_norm with --secure_aggregation: the server cannot clip updates it never "
                            "sees; set --max_update_norm 0 (--secagg_clip bounds every coordinate)")
        if self.client_sampling == "poisson":
            problems.append("--client_sampling poisson with --secure_aggregation is not supported")
        return problems
