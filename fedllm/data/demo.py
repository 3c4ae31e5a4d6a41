"""Synthetic demo data for a federation of a few clients, easy enough for the tiny random Llama.

Each client gets its own task family (non-IID): short, consistent, highly repetitive answers made
of simple English words and digits, so a 2-layer model with hidden size 64 learns them in a few
dozen steps and a federated run shows a falling loss within minutes on a CPU.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

WORDS = ["cat", "dog", "bird", "fish", "red", "blue", "green", "apple"]  # few, so copying them is quick to learn
NAMES = {"fruit": "apple", "animal": "dog", "color": "blue", "number": "three"}
COLORS = {"apple": "red", "banana": "yellow", "cherry": "red", "grass": "green", "sky": "blue", "sun": "yellow",
          "water": "blue", "leaf": "green"}


def _name(rng: random.Random) -> tuple[str, str]:
    kind = rng.choice(sorted(NAMES))
    return f"Name a{'n' if kind[0] in 'aeiou' else ''} {kind}.", NAMES[kind]


def _repeat(rng: random.Random) -> tuple[str, str]:
    word = rng.choice(WORDS)
    return f"Repeat: {word}", " ".join([word] * 3)


def _count(rng: random.Random) -> tuple[str, str]:
    start = rng.randrange(1, 10)
    return f"Count from {start}", " ".join(str(n) for n in range(start, start + 4))


def _color(rng: random.Random) -> tuple[str, str]:
    thing = rng.choice(sorted(COLORS))
    return f"What color is the {thing}?", COLORS[thing]


# Client i gets family i % len(FAMILIES); the family name is each row's "category".
FAMILIES: list[tuple[str, Callable[[random.Random], tuple[str, str]]]] = [
    ("name", _name), ("repeat", _repeat), ("count", _count), ("color", _color),
]


def _rows(client: int, count: int, rng: random.Random) -> list[dict[str, str]]:
    category, make = FAMILIES[client % len(FAMILIES)]
    rows = []
    for _ in range(count):
        instruction, output = make(rng)
        rows.append({"instruction": instruction, "input": "", "output": output, "category": category})
    return rows


def _write_jsonl(path: Path, rows: list[dict[str, str]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def write_demo_data(out_dir: str | Path, num_clients: int = 3, rows_per_client: int = 64, seed: int = 0) -> list[Path]:
    """Write ``client_{i}.jsonl`` (Alpaca format) for each client and a ``held_out.jsonl``; return the client files.

    ``held_out.jsonl`` (in the same folder) mixes every client's task family, ``max(4, rows_per_client // 8)``
    rows each, drawn independently of the training rows (the prompt space is small, so some repeat).
    The output is the same for the same arguments.
    """
    if num_clients < 1 or rows_per_client < 1:
        raise ValueError("num_clients and rows_per_client must be at least 1")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # String seeds are hashed with SHA-512 by random, so they are stable across runs and machines.
    paths = [
        _write_jsonl(out / f"client_{i}.jsonl", _rows(i, rows_per_client, random.Random(f"demo-{seed}-{i}")))
        for i in range(num_clients)
    ]
    held_out_rng = random.Random(f"demo-held-out-{seed}")
    held_out = [row for i in range(num_clients) for row in _rows(i, max(4, rows_per_client // 8), held_out_rng)]
    _write_jsonl(out / "held_out.jsonl", held_out)
    return paths
