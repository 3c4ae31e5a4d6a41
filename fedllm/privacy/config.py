"""The federation's differential-privacy options (``--dp`` ...): part of its identity, served to clients.

No torch here: :mod:`fedllm.config` imports this to build :class:`~fedllm.config.FederationArguments`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ..algorithms.base_config import range_problem

DP_MODES = ("off", "server", "client")
CLIENT_SAMPLING = ("uniform", "poisson")
AUTO = "auto"
# Algorithms whose server step is a function of the mean delta alone: DP-FedAvg's noised mean feeds them
# (FedOpt and FedAvgM are post-processing of it). Robust rules need individual updates; SCAFFOLD's control
# variates would travel unnoised.
DP_COMPATIBLE = ("fedavg", "fedprox", "fedavgm", "fedadagrad", "fedyogi", "fedadam")


@dataclass
class PrivacyArguments:
    """Client-level differential privacy (DP-FedAvg, McMahan et al. 2018; adaptive clipping, Andrew et al. 2021).

    See docs/privacy.md for the threat model of each mode and the accounting.
    """

    dp: str = field(
        default="off",
        metadata={"help": "Client-level DP-FedAvg: 'server' (clients send raw deltas; the server clips each to "
                          "--dp_clip_norm and adds Gaussian noise to the mean: a trusted server), 'client' "
                          "(clients clip before upload, the server refuses an update over the norm with 422 and "
                          "adds the noise), or off.", "choices": list(DP_MODES)},
    )
    dp_clip_norm: str = field(
        default="1.0",
        metadata={"help": "L2 norm C every client delta is clipped to (over all adapter tensors together), or "
                          "'auto': adaptive clipping to the --dp_target_quantile of the update norms."},
    )
    dp_noise_multiplier: float = field(
        default=1.0,
        metadata={"help": "σ: the mean gets N(0, (σ·C/m)²) noise per coordinate (m participants). 0 = clipping "
                          "alone, no privacy guarantee (ε is then reported as null)."},
    )
    dp_delta: float | None = field(
        default=None,
        metadata={"help": "δ of the (ε, δ) guarantee, in (0, 1); default 1 / num_clients^1.1 (below 1/N, so "
                          "that a mechanism leaking one client's data whole is ruled out)."},
    )
    dp_target_epsilon: float | None = field(
        default=None,
        metadata={"help": "Privacy budget ε: the server computes at start how many rounds it allows and never "
                          "starts a round that would exceed it (it finishes early, with an event)."},
    )
    dp_target_quantile: float = field(
        default=0.5, metadata={"help": "Adaptive clipping: the fraction γ of updates that should be unclipped."}
    )
    dp_clip_learning_rate: float = field(
        default=0.2, metadata={"help": "Adaptive clipping: η_C of the geometric update C ← C·exp(−η_C (b̄ − γ))."}
    )
    dp_initial_clip_norm: float = field(
        default=0.1, metadata={"help": "Adaptive clipping: the clip norm of the first round."}
    )
    dp_clipped_count_stddev: float | None = field(
        default=None,
        metadata={"help": "Adaptive clipping: σ_b, the noise on the count of unclipped updates; default "
                          "max((clients per round) / 20, 1/σ): Andrew et al.'s m/20, raised where a small federation "
                          "would leave no noise for the mean (σ_Δ needs 2σ_b > 1/σ)."},
    )
    client_sampling: str = field(
        default="uniform",
        metadata={"help": "How a round's clients are drawn: 'uniform' (exactly --sample_clients, without "
                          "replacement, seeded) or 'poisson' (each client independently with probability "
                          "--sample_clients / --num_clients; what the sampled-Gaussian analysis assumes; "
                          "with --dp only).", "choices": list(CLIENT_SAMPLING)},
    )

    # ------------------------------------------------------------------ derived values
    @property
    def dp_enabled(self) -> bool:
        return self.dp != "off"

    @property
    def adaptive_clipping(self) -> bool:
        return str(self.dp_clip_norm).strip().lower() == AUTO

    def fixed_clip_norm(self) -> float:
        """C of fixed clipping (ValueError when it is not a number)."""
        return float(self.dp_clip_norm)

    def effective_delta(self) -> float:
        return self.dp_delta if self.dp_delta is not None else 1.0 / self.num_clients ** 1.1

    def clipped_count_stddev(self) -> float:
        if self.dp_clipped_count_stddev is not None:
            return self.dp_clipped_count_stddev
        floor = 1.0 / self.dp_noise_multiplier if self.dp_noise_multiplier > 0 else 0.0
        return max(self.sample_clients / 20.0, floor)

    # ------------------------------------------------------------------ validation
    def privacy_problems(self: Any) -> list[str]:
        """What is wrong with the privacy options (flags and ranges named), given the rest of the federation."""
        if not self.dp_enabled:
            return ["--client_sampling poisson needs --dp (it only changes what the accountant assumes)"] \
                if self.client_sampling == "poisson" else []
        problems = [p for p in [
            range_problem("dp_noise_multiplier", self.dp_noise_multiplier, at_least=0),
            range_problem("dp_delta", self.dp_delta, above=0, below=1) if self.dp_delta is not None else None,
            range_problem("dp_target_epsilon", self.dp_target_epsilon, above=0)
            if self.dp_target_epsilon is not None else None,
        ] if p]
        if self.adaptive_clipping:
            problems += [p for p in [
                range_problem("dp_target_quantile", self.dp_target_quantile, above=0, below=1),
                range_problem("dp_clip_learning_rate", self.dp_clip_learning_rate, above=0),
                range_problem("dp_initial_clip_norm", self.dp_initial_clip_norm, above=0),
                range_problem("dp_clipped_count_stddev", self.dp_clipped_count_stddev, above=0)
                if self.dp_clipped_count_stddev is not None else None,
            ] if p]
            if self.dp_noise_multiplier > 0 and 2 * self.clipped_count_stddev() <= 1 / self.dp_noise_multiplier:
                # z_Δ = (z⁻² − (2σ_b)⁻²)^(−1/2) needs 2σ_b > 1/z (Andrew et al., Theorem 1).
                problems.append(f"--dp_clipped_count_stddev {self.clipped_count_stddev():g} is too small for "
                                f"--dp_noise_multiplier {self.dp_noise_multiplier:g}: need 2σ_b > 1/σ")
        else:
            try:
                clip = self.fixed_clip_norm()
            except ValueError:
                problems.append(f"--dp_clip_norm must be a number > 0 or 'auto', got {self.dp_clip_norm!r}")
            else:
                problem = range_problem("dp_clip_norm", clip, above=0)
                if problem or not math.isfinite(clip):
                    problems.append(problem or f"--dp_clip_norm must be finite, got {clip}")
        if self.fed_alg not in DP_COMPATIBLE:
            problems.append(f"--dp {self.dp} with --fed_alg {self.fed_alg} is refused: DP-FedAvg noises the mean "
                            f"delta, which only {', '.join(DP_COMPATIBLE)} aggregate; robust rules need individual "
                            "updates and SCAFFOLD's control variates would travel unnoised")
        if self.max_update_norm > 0:
            problems.append("--max_update_norm with --dp: the DP clip norm (--dp_clip_norm) is the clipping; "
                            "set --max_update_norm 0")
        return problems
