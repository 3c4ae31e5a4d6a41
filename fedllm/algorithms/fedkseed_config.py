"""FedKSeed's hyperparameters (:class:`~.fedkseed.FedKSeed`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .base_config import AlgorithmConfig, check_range

MAX_SEEDS = 1 << 20


@dataclass
class FedKSeedConfig(AlgorithmConfig):
    """Zeroth-order full-parameter tuning on a shared pool of K random seeds (Qin et al., ICML 2024)."""

    kseed_k: int = field(
        default=4096,
        metadata={"help": "FedKSeed: K, the seeds of the shared pool (the global model is K float32 scalars), "
                          f"in [1, {MAX_SEEDS}]."},
    )
    kseed_epsilon: float = field(
        default=1e-3,
        metadata={"help": "FedKSeed: ε > 0 of the two-point estimate (L(w + εz) − L(w − εz)) / 2ε."},
    )
    kseed_pro: bool = field(
        default=False,
        metadata={"help": "FedKSeed-Pro: clients draw seeds with probabilities that grow with the mean amplitude "
                          "of each seed's past scalars (uniform otherwise)."},
    )
    kseed_lora: bool = field(
        default=False,
        metadata={"help": "FedKSeed on the LoRA parameters only (the federation's LoRA adapter, initialised from "
                          "the pool's first seed), instead of every parameter of the base model."},
    )

    def validate(self, federation) -> None:
        super().validate(federation)
        check_range("kseed_k", self.kseed_k, at_least=1, at_most=MAX_SEEDS)
        check_range("kseed_epsilon", self.kseed_epsilon, above=0)
        if isinstance(self.kseed_k, float):
            raise ValueError(f"--kseed_k must be an integer, got {self.kseed_k!r}")
        if federation.wire_dtype != "float32":
            raise ValueError("--fed_alg fedkseed needs --wire_dtype float32: the served pool seed is an integer below "
                             "2^24, exact in float32 only")
        if self.max_update_norm > 0:
            raise ValueError("--max_update_norm does not apply to --fed_alg fedkseed (its updates are seed scalars)")
