"""Split one dataset into per-client files for a federated run (or a simulation of one).

Strategies, all deterministic for a seed and each a partition (every record goes to exactly one client):

* ``iid``: shuffle, then deal out near-equal shares.
* ``dirichlet``: label skew after Hsu et al. (2019): for every category of ``--field`` the clients'
  shares are drawn from Dirichlet(alpha); a small alpha gives each client few categories. A client
  that draws nothing gets one record from the largest client, so no client file is empty.
* ``by_field``: whole categories per client, assigned largest first to the client with the fewest
  records so far (ties broken by the seed).

Example::

    python -m fedllm.data.split data.jsonl --num_clients 4 --strategy dirichlet --field category \\
        --alpha 0.5 --seed 0 --output_dir clients/
"""

from __future__ import annotations

import argparse
import json
import random
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from fedllm.data.records import DataFormatError, load_records

STRATEGIES = ("iid", "dirichlet", "by_field")


def _labels(records: list[dict], field: str | None) -> list[str]:
    if not field:
        raise ValueError("this strategy needs field= (the label or category to split on)")
    labels = []
    for i, record in enumerate(records, start=1):
        if record.get(field) is None:
            raise DataFormatError(f"record {i} has no value for field {field!r}", fields=list(record))
        labels.append(str(record[field]))
    return labels


def _iid(n: int, num_clients: int, rng: random.Random) -> list[list[int]]:
    order = list(range(n))
    rng.shuffle(order)
    return [order[i::num_clients] for i in range(num_clients)]


def _by_category(labels: list[str]) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = defaultdict(list)
    for i, label in enumerate(labels):
        groups[label].append(i)
    return dict(sorted(groups.items()))


def _dirichlet(labels: list[str], num_clients: int, alpha: float, rng: random.Random) -> list[list[int]]:
    if alpha <= 0:
        raise ValueError(f"alpha must be positive, got {alpha}")
    shares: list[list[int]] = [[] for _ in range(num_clients)]
    for indices in _by_category(labels).values():
        rng.shuffle(indices)
        weights = [rng.gammavariate(alpha, 1.0) for _ in range(num_clients)]
        total = sum(weights)
        if total == 0:  # every draw underflowed (tiny alpha): one client takes the category
            winner = rng.randrange(num_clients)
            weights, total = [float(i == winner) for i in range(num_clients)], 1.0
        start, cumulative = 0, 0.0
        for client, weight in enumerate(weights):
            cumulative += weight / total
            end = len(indices) if client == num_clients - 1 else round(cumulative * len(indices))
            shares[client].extend(indices[start:end])
            start = end
    for share in shares:
        if not share:
            share.append(max(shares, key=len).pop())
    return shares


def _by_field(labels: list[str], num_clients: int, rng: random.Random) -> list[list[int]]:
    groups = list(_by_category(labels).items())
    if len(groups) < num_clients:
        raise ValueError(f"only {len(groups)} categories for {num_clients} clients; use the dirichlet strategy")
    rng.shuffle(groups)
    groups.sort(key=lambda group: -len(group[1]))  # stable: equal sizes keep the seeded order
    shares: list[list[int]] = [[] for _ in range(num_clients)]
    for _, indices in groups:
        min(shares, key=len).extend(indices)
    return shares


def split_records(
    records: list[dict],
    num_clients: int,
    strategy: str,
    *,
    field: str | None = None,
    alpha: float = 0.5,
    seed: int = 0,
) -> list[list[dict]]:
    """Partition ``records`` into ``num_clients`` lists (see the module docstring for the strategies)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if not 1 <= num_clients <= len(records):
        raise ValueError(f"num_clients must be between 1 and the number of records ({len(records)})")
    rng = random.Random(seed)
    if strategy == "iid":
        shares = _iid(len(records), num_clients, rng)
    elif strategy == "dirichlet":
        shares = _dirichlet(_labels(records, field), num_clients, alpha, rng)
    else:
        shares = _by_field(_labels(records, field), num_clients, rng)
    for share in shares:  # mix categories within a client file; the order used to split them is arbitrary
        rng.shuffle(share)
    return [[records[i] for i in share] for share in shares]


def summary_table(clients: list[list[dict]], field: str | None) -> str:
    """One line per client: its record count and, with ``field``, its count per category."""
    categories = sorted({str(r.get(field)) for client in clients for r in client}) if field else []
    header = ["client", "records", *categories]
    lines = [header]
    for i, client in enumerate(clients):
        counts = Counter(str(r.get(field)) for r in client) if field else Counter()
        lines.append([str(i), str(len(client)), *(str(counts[c]) for c in categories)])
    widths = [max(len(line[col]) for line in lines) for col in range(len(header))]
    return "\n".join("  ".join(cell.rjust(width) for cell, width in zip(line, widths, strict=True)) for line in lines)


def write_clients(clients: list[list[dict[str, Any]]], output_dir: str | Path) -> list[Path]:
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, client in enumerate(clients):
        path = out / f"client_{i}.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in client), encoding="utf-8")
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m fedllm.data.split", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("source", help="A .json/.jsonl/.parquet/.csv file, a folder, or a Hugging Face dataset name.")
    parser.add_argument("--num_clients", type=int, required=True)
    parser.add_argument("--strategy", choices=STRATEGIES, default="iid")
    parser.add_argument("--field", help="Label/category field (dirichlet, by_field; with iid only for the summary).")
    parser.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration: smaller is more skewed.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--field_map", help="Rename fields first, e.g. 'question=instruction,answer=output'.")
    parser.add_argument("--output_dir", required=True)
    args = parser.parse_args(argv)
    try:
        records = load_records(args.source, field_map=args.field_map)
        clients = split_records(records, args.num_clients, args.strategy, field=args.field, alpha=args.alpha,
                                seed=args.seed)
    except DataFormatError as e:
        parser.exit(2, f"error: {e if e.source else f'{args.source}: {e}'}\n")
    except ValueError as e:
        parser.exit(2, f"error: {e}\n")
    paths = write_clients(clients, args.output_dir)
    print(summary_table(clients, args.field))
    print(f"wrote {len(paths)} files to {args.output_dir}")


if __name__ == "__main__":
    main()
