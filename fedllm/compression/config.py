"""The federation's update-compression and communication-budget options: served to clients by ``/v1/config``.

No torch here: :mod:`fedllm.config` imports this to build :class:`~fedllm.config.FederationArguments`.
The codec options (``--update_compression``, ``--compression_block_size``, ``--topk_fraction``) are
identity settings -- they decide what the server aggregates -- while ``--communication_budget_mb`` is
operational: an operator may raise it on restart.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..algorithms.base_config import range_problem

CODECS = ("none", "int8", "nf4", "fp4", "topk")
# Options an operator may change on restart (the others are identity).
COMPRESSION_OPERATIONAL = frozenset({"communication_budget_mb"})
# Algorithms whose uploads carry tensors besides the delta (SCAFFOLD's control.Δc_i), which the server
# mirrors exactly; a lossy codec would make its c drift from the clients' c_i.
UNCOMPRESSIBLE_ALGORITHMS = ("scaffold", "fedkseed")
BUDGET_WARNING_FRACTION = 0.8


@dataclass
class CompressionArguments:
    """Compressed client updates (docs/compression.md) and the run's communication budget."""

    update_compression: str = field(
        default="none",
        metadata={"help": "Codec of client updates: none (dense, --wire_dtype), int8 / nf4 / fp4 (blockwise absmax "
                          "quantization, bitsandbytes' code tables) or topk (the --topk_fraction largest entries of "
                          "each tensor as indices + values). Lossy codecs keep the client's error feedback "
                          "(the residual joins the next round's delta).", "choices": list(CODECS)},
    )
    compression_block_size: int = field(
        default=128,
        metadata={"help": "int8/nf4/fp4: values per absmax block (each block carries one float32 scale), >= 2."},
    )
    topk_fraction: float = field(
        default=0.01,
        metadata={"help": "topk: fraction of each tensor's entries sent, in (0, 1] (at least one per tensor)."},
    )
    communication_budget_mb: float = field(
        default=0.0,
        metadata={"help": "Run budget in MB (10^6 bytes) of upload bodies received plus global downloads sent; a "
                          "warning at 80%, no new round once it is spent (the federation finishes). 0 = none."},
    )

    @property
    def compression_enabled(self) -> bool:
        return self.update_compression != "none"

    def budget_bytes(self) -> int | None:
        return int(self.communication_budget_mb * 1e6) if self.communication_budget_mb > 0 else None

    def compression_problems(self: Any) -> list[str]:
        """What is wrong with the compression options (flags and ranges named), given the rest of the federation."""
        problems = [p for p in [
            range_problem("compression_block_size", self.compression_block_size, at_least=2),
            range_problem("topk_fraction", self.topk_fraction, above=0, at_most=1),
            range_problem("communication_budget_mb", self.communication_budget_mb, at_least=0),
        ] if p]
        if isinstance(self.compression_block_size, float):
            problems.append(f"--compression_block_size must be an integer, got {self.compression_block_size!r}")
        if not self.compression_enabled:
            return problems
        if self.fed_alg in UNCOMPRESSIBLE_ALGORITHMS:
            problems.append(f"--update_compression {self.update_compression} with --fed_alg {self.fed_alg} is "
                            "refused: its uploads are not a dense delta the codecs apply to")
        if self.dp == "client":
            problems.append(f"--update_compression {self.update_compression} with --dp client is refused: the "
                            "server checks each delta's norm against the clip norm, which quantization error breaks")
        return problems
