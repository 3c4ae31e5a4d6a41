"""Benchmark: the cost of SecAgg+ (fedllm.secagg) against a plain float32 upload, in the same run.

The baseline is what a client does for a plain upload: ``fedllm.wire.encode`` of the delta as float32
safetensors plus the sha256 of the body. A secure upload instead encodes the delta into Z_{2^32}, adds the self
mask and one pairwise mask per neighbour (AES-128-CTR keystreams), writes the safetensors body and hashes it.
The server's unmasking adds the survivors' masked inputs and removes the masks it rebuilt from Shamir shares.

Headline (7B r=16 q,v, 10 clients, the complete graph of SecAgg at that size): the real protocol of
:func:`fedllm.secagg.local.run_attempt`, 0 and 2 dropouts (after the share exchange). Growth: the client's and
the server's work at the full adapter size as the federation grows, with the complete graph (SecAgg) and with
SecAgg+'s k = auto(n) neighbours, timed on the same mask operations the protocol runs.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from .common import (
    QV_7B,
    QV_QUICK,
    RESULTS_DIR,
    Table,
    Target,
    benchmark_main,
    interleaved,
    random_adapter,
    write_results,
)

NAME = "secagg"
TITLE = "Secure aggregation (SecAgg+): client masking, bytes, server unmasking"
CPU_TARGET = 2.0  # client masking ≤ 2× the plain upload's encode + hash
BYTES_TARGET = 1.1  # masked input ≤ 1.1× the float32 upload


def _best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def _setup(n: int, length: int, neighbours: int):
    from fedllm.secagg.graph import auto_neighbours
    from fedllm.secagg.protocol import RoundSetup

    clients = tuple(f"client{i:04d}" for i in range(n))
    return RoundSetup(context="bench", round=1, attempt=0, clients=clients, weights=dict.fromkeys(clients, 1 / n),
                      neighbours=neighbours or auto_neighbours(n), threshold_spec=0.5, bits=32, clip=1.0,
                      length=length)


def headline(size, repeat: int) -> tuple[dict[str, Any], list[list[Any]]]:
    """The real protocol, 10 clients: client costs, message bytes, server unmasking with 0 and 2 dropouts."""
    import torch

    from fedllm.secagg.protocol import ClientRound, ServerRound, unmask_sum
    from fedllm.secagg.wire import masked_file
    from fedllm.wire import encode

    tensors = random_adapter(size.spec(), seed=0)
    names = sorted(tensors)
    flat = torch.cat([tensors[n].reshape(-1) for n in names]).numpy()
    setup = _setup(10, flat.size + 1, 0)
    fixed = setup.fixed_point

    def plain() -> None:
        hashlib.sha256(encode(tensors, "float32")).hexdigest()

    # One client's masked input, with its real keys and shares (the others' stages run once, untimed).
    server = ServerRound(setup)
    parties = {c: ClientRound(c, setup) for c in setup.clients}
    for c, p in parties.items():
        server.receive_keys(c, 1, 0, p.advertise())
    server.close_stage()
    share_bytes = 0
    for c, p in parties.items():
        message = p.share(server.view(c)["keys"])
        share_bytes = max(share_bytes, len(json.dumps(message)))
        server.receive_shares(c, 1, 0, message)
    server.close_stage()
    me = setup.clients[0]
    view = server.view(me)
    encoded = fixed.encode(flat, setup.weights[me])[0]

    def secure() -> bytes:
        vector = fixed.encode(flat, setup.weights[me])[0]
        masked, excluded = parties[me].masked_input(view["u2"], view["shares"], vector)
        return masked_file(masked, excluded)  # sent without a client-side digest: the server hashes it

    times = interleaved({"plain": plain, "secure": secure}, repeat=repeat, warmup=1)
    plain_s, secure_s = min(times["plain"]), min(times["secure"])
    ratio = statistics.median(s / p for s, p in zip(times["secure"], times["plain"], strict=True))
    masked_bytes = len(secure())
    plain_bytes = len(encode(tensors, "float32"))
    key_bytes = len(json.dumps(parties[me].advertise()))
    rows = []
    data: dict[str, Any] = {"params": size.num_params, "plain_s": plain_s, "secure_s": secure_s, "ratio": ratio,
                            "plain_bytes": plain_bytes, "masked_bytes": masked_bytes, "key_bytes": key_bytes,
                            "share_bytes": share_bytes, "neighbours": min(setup.neighbours, 9)}
    for dropped in (0, 2):
        encoded_all = {c: encoded for c in setup.clients}  # the server's cost does not depend on the values
        drop = {"share": list(setup.clients[-dropped:])} if dropped else {}
        final, stored = _protocol(setup, encoded_all, drop)
        corrections = final.corrections()

        def unmask(final=final, stored=stored) -> None:
            masks = final.corrections()
            fixed.decode_mean(unmask_sum((stored[c] for c in final.state["u3"]), masks, fixed, setup.length))

        seconds = _best(unmask, repeat)
        unmask_request = max(len(json.dumps(a)) for a in final.state["unmask"].values())
        data[f"unmask_{dropped}_s"] = seconds
        data[f"unmask_{dropped}_masks"] = len(corrections)
        rows.append([size.label, 10, dropped, len(corrections), seconds, unmask_request])
    return data, rows


def _protocol(setup, encoded: dict, drop: dict):
    """The stages of fedllm.secagg.local.run_attempt up to a complete unmasking stage; the removal of the masks
    is left to the caller, who times it."""
    from fedllm.secagg.protocol import ClientRound, ServerRound

    server = ServerRound(setup)
    parties = {c: ClientRound(c, setup) for c in setup.clients}
    alive = set(setup.clients)
    for c in sorted(alive):
        server.receive_keys(c, 1, 0, parties[c].advertise())
    server.close_stage()
    for c in sorted(alive):
        server.receive_shares(c, 1, 0, parties[c].share(server.view(c)["keys"]))
    alive -= set(drop.get("share", []))
    server.close_stage()
    stored = {}
    for c in sorted(alive):
        view = server.view(c)
        stored[c], excluded = parties[c].masked_input(view["u2"], view["shares"], encoded[c])
        server.receive_masked(c, 1, 0, c, excluded)
    server.close_stage()
    for c in server.expected():
        server.receive_unmask(c, 1, 0, parties[c].unmask(server.view(c)["u3"]))
    assert server.close_stage() == "done"
    return server, stored


def growth(length: int, clients: list[int], repeat: int) -> list[list[Any]]:
    """Client masking (k + 1 PRG masks) and server unmasking (n adds + n self-masks, no dropout) at full size."""
    from fedllm.secagg.encoding import FixedPoint
    from fedllm.secagg.graph import auto_neighbours
    from fedllm.secagg.protocol import add_masks

    fixed = FixedPoint(32, 1.0)
    vector = np.random.default_rng(0).integers(0, 2**32, length, dtype=np.uint64).astype(np.uint32)
    masks = [(secrets.token_bytes(32), 1) for _ in range(10)]
    mask_s = _best(lambda: add_masks(vector.copy(), masks, fixed), repeat) / len(masks)
    add_s = _best(lambda: fixed.reduce(np.add(vector, vector)), repeat)
    rows = []
    for n in clients:
        for graph, k in (("SecAgg (complete)", n - 1), ("SecAgg+ (auto)", min(auto_neighbours(n), n - 1))):
            client_s = (k + 1) * mask_s
            server_s = n * (add_s + mask_s)
            shares_bytes = k * 2 * (12 + 16 + 2 * 66 + 30)  # per client sent: nonce, tag, two shares, JSON
            rows.append([n, graph, k, client_s, server_s, shares_bytes])
    return rows


def run(out_dir: Path = RESULTS_DIR, quick: bool = False) -> dict[str, Any]:
    size = QV_QUICK if quick else QV_7B
    repeat = 2 if quick else 3
    data, unmask_rows = headline(size, repeat)
    sizes = [10, 20] if quick else [10, 40, 100, 1000]
    growth_rows = growth(size.num_params + 1, sizes, repeat)
    cpu_ratio = data["ratio"]
    bytes_ratio = data["masked_bytes"] / data["plain_bytes"]
    client = Table("One client's upload, 10 clients (complete graph: 9 neighbours): best times, median ratio of "
                   "interleaved runs",
                   ["adapter", "params", "plain encode+hash s", "secagg encode+mask+body s", "client time ratio",
                    "float32 MB", "masked MB", "masked / float32", "keys B", "shares B"])
    client.rows.append([size.label, size.num_params, data["plain_s"], data["secure_s"], cpu_ratio,
                        data["plain_bytes"] / 1e6, data["masked_bytes"] / 1e6, bytes_ratio, data["key_bytes"],
                        data["share_bytes"]])
    server = Table("Server unmasking (10 clients): rebuild the secrets, add the masked inputs, remove the masks",
                   ["adapter", "clients", "dropped after sharing", "masks removed", "unmask s", "largest unmask msg B"])
    server.rows.extend(unmask_rows)
    grows = Table("Growth with the federation (full adapter size; PRG-mask and add costs measured, multiplied out)",
                  ["clients n", "graph", "neighbours k", "client masking s", "server unmasking s (0 dropped)",
                   "share bytes sent per client"])
    grows.rows.extend(growth_rows)
    targets = [
        Target(f"client masking vs plain encode+hash, {size.label}", f"≤ {CPU_TARGET:g}×", f"{cpu_ratio:.2f}×",
               None if quick else cpu_ratio <= CPU_TARGET),
        Target(f"masked input vs float32 upload bytes, {size.label}", f"≤ {BYTES_TARGET:g}×", f"{bytes_ratio:.4f}×",
               None if quick else bytes_ratio <= BYTES_TARGET),
    ]
    notes = [
        "Client time = FixedPoint.encode + ClientRound.masked_input (1 self mask + k pairwise AES-128-CTR "
        "keystreams, each with its X25519 + HKDF) + the safetensors body (the client sends no digest of it: the server hashes what it stores); the baseline = "
        "fedllm.wire.encode (float32) + sha256. Neither includes training or the network.",
        "The key (stage 1) and share (stage 2) messages are the JSON bodies; the masked input is uint32 (bits 32).",
        "Server unmasking = Shamir reconstruction (+ the X25519 of each dropped client with each surviving "
        "neighbour) + the sum + removing every mask, one vector in memory at a time.",
        "Growth: a client's work is k + 1 masks, so SecAgg's complete graph grows linearly in n per client (n² in "
        "all) and SecAgg+'s k = O(log n) keeps it logarithmic; the server's work is n adds + n self masks "
        "(+ k per dropped client) either way.",
    ]
    return write_results(NAME, TITLE, out_dir, quick=quick,
                         params={"size": size.label, "repeat": repeat, "clients": sizes},
                         tables=[client, server, grows], targets=targets, notes=notes, data=data)


def main(argv: list[str] | None = None) -> None:
    benchmark_main(NAME, __doc__, run, argv)


if __name__ == "__main__":
    main()
