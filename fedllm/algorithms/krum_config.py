"""Krum's hyperparameters (:class:`~.krum.Krum`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .base_config import AlgorithmConfig, check_range


@dataclass
class KrumConfig(AlgorithmConfig):
    """Average the m deltas with the lowest Krum scores, tolerating f malicious clients of the K per round."""

    krum_malicious: int = field(
        default=1,
        metadata={"help": "Krum: assumed number of malicious clients f >= 0; needs --sample_clients > 2f + 2."},
    )
    krum_keep: int = field(
        default=1,
        metadata={"help": "Krum: updates m averaged (1 = Krum, >1 = multi-Krum), in [1, --sample_clients - f]."},
    )

    def validate(self, federation) -> None:
        super().validate(federation)
        f, m, k = self.krum_malicious, self.krum_keep, federation.sample_clients
        check_range("krum_malicious", f, at_least=0)
        check_range("krum_keep", m, at_least=1)
        if not k > 2 * f + 2:  # Blanchard et al.'s condition for Krum to tolerate f of the K clients
            raise ValueError(f"--sample_clients must be > 2 * --krum_malicious + 2 = {2 * f + 2} for --fed_alg krum "
                             f"(Krum tolerates f malicious clients of K only if K > 2f + 2), got {k}")
        if not m <= k - f:  # of K updates at most K − f are honest: averaging more takes in a malicious one
            raise ValueError(f"--krum_keep must be <= --sample_clients - --krum_malicious = {k - f}, got {m}")
