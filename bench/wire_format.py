"""Benchmark 2: the wire format -- bytes per update, encode/decode/validate time, fp32 and bf16.

fedllm sends safetensors (``fedllm.wire.encode``; the server validates with
``validate_tensors_file`` and reads with ``FileUpdate``; clients load with ``decode_file``). The
baseline is the format of a known Flask fork of OpenFedLLM: the state dict as JSON float lists,
``json.dumps({name: tensor.tolist()})``, decoded with ``json.loads`` and ``torch.tensor``.
"""

from __future__ import annotations

import json
import shutil
import statistics
import tempfile
from pathlib import Path
from typing import Any

from .common import (
    ALL_7B,
    ALL_QUICK,
    MB,
    QV_7B,
    QV_QUICK,
    RESULTS_DIR,
    AdapterSize,
    Table,
    Target,
    benchmark_main,
    interleaved,
    random_adapter,
    write_results,
)

NAME = "wire_format"
TITLE = "Wire format: safetensors (fp32, bf16) vs JSON float lists"
OVERHEAD_TARGET = 0.001  # bytes beyond the raw tensor bytes, as a fraction
SIZE_TARGET = 10.0  # bf16 at least this many times smaller than JSON
SPEED_TARGET = 100.0  # bf16 encode at least this many times faster than JSON


def json_encode(tensors: dict) -> bytes:
    """The baseline: the state dict as JSON float lists."""
    return json.dumps({name: t.tolist() for name, t in tensors.items()}).encode()


def json_decode(body: bytes) -> dict:
    import torch

    return {name: torch.tensor(values, dtype=torch.float32) for name, values in json.loads(body).items()}


def measure(size: AdapterSize, directory: Path, repeat: int, with_json: bool, json_repeat: int) -> dict[str, Any]:
    """Bytes and interleaved timings for one adapter size."""
    from fedllm.wire import decode_file, encode, validate_tensors_file

    spec = size.spec()
    tensors = random_adapter(spec, seed=0)
    metadata = {"train_loss": repr(1.2345), "steps": repr(10.0)}
    result: dict[str, Any] = {"params": size.num_params, "formats": {}}
    cases = {}
    for dtype, itemsize in (("float32", 4), ("bfloat16", 2)):
        body = encode(tensors, dtype, metadata=metadata)
        path = directory / f"update-{dtype}.safetensors"
        path.write_bytes(body)
        raw = size.num_params * itemsize
        result["formats"][dtype] = {"bytes": len(body), "raw_bytes": raw, "overhead": (len(body) - raw) / raw}
        cases[f"{dtype} encode"] = lambda dtype=dtype: encode(tensors, dtype, metadata=metadata)
        cases[f"{dtype} decode"] = lambda path=path: decode_file(path)
        cases[f"{dtype} validate"] = lambda path=path, dtype=dtype: validate_tensors_file(path, spec, dtype)
    times = interleaved(cases, repeat=repeat, warmup=1)
    if with_json:
        body = json_encode(tensors)
        result["formats"]["json"] = {"bytes": len(body), "raw_bytes": size.num_params * 4,
                                     "overhead": (len(body) - size.num_params * 4) / (size.num_params * 4)}
        times.update(interleaved({"json encode": lambda: json_encode(tensors), "json decode": lambda: json_decode(body)},
                                 repeat=json_repeat, warmup=0))
    result["times"] = times
    return result


def run(out_dir: Path = RESULTS_DIR, quick: bool = False, workdir: Path | None = None) -> dict[str, Any]:
    sizes = [(QV_QUICK, True), (ALL_QUICK, False)] if quick else [(QV_7B, True), (ALL_7B, False)]
    repeat, json_repeat = (3, 1) if quick else (5, 2)
    table = Table("Bytes and time per update (best of the runs)",
                  ["adapter", "format", "MB", "bytes/param", "overhead vs raw", "encode s", "decode s",
                   "validate s", "encode M params/s"])
    targets: list[Target] = []
    raw: dict[str, Any] = {}
    directory = Path(tempfile.mkdtemp(prefix="fedllm-bench-wire-", dir=workdir))
    try:
        for size, with_json in sizes:
            result = measure(size, directory, repeat, with_json, json_repeat)
            raw[size.label] = result
            best = {name: min(t) for name, t in result["times"].items()}
            for fmt, info in result["formats"].items():
                encode_s = best[f"{fmt} encode"]
                table.rows.append([size.label, fmt, info["bytes"] / MB, info["bytes"] / size.num_params,
                                   f"{100 * info['overhead']:+.4f}%", encode_s, best[f"{fmt} decode"],
                                   best.get(f"{fmt} validate", float("nan")), size.num_params / encode_s / 1e6])
            for fmt in ("float32", "bfloat16"):
                overhead = result["formats"][fmt]["overhead"]
                targets.append(Target(f"{fmt} size overhead, {size.label}", f"≤ {100 * OVERHEAD_TARGET:g}% over raw",
                                      f"{100 * overhead:.4f}%", None if quick else overhead <= OVERHEAD_TARGET))
            if with_json:
                smaller = result["formats"]["json"]["bytes"] / result["formats"]["bfloat16"]["bytes"]
                faster = best["json encode"] / best["bfloat16 encode"]
                targets.append(Target(f"bf16 vs JSON size, {size.label}", f"≥ {SIZE_TARGET:g}× smaller",
                                      f"{smaller:.1f}× smaller", None if quick else smaller >= SIZE_TARGET))
                targets.append(Target(f"bf16 vs JSON encode time, {size.label}", f"≥ {SPEED_TARGET:g}× faster",
                                      f"{faster:.0f}× faster", None if quick else faster >= SPEED_TARGET))
                raw[size.label]["json_encode_s_per_million"] = statistics.median(
                    result["times"]["json encode"]) / (size.num_params / 1e6)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    notes = [
        "Overhead is the safetensors header (names, dtypes, shapes, offsets, metadata) over the raw tensor bytes.",
        "decode = fedllm.wire.decode_file (to fp32 tensors); validate = validate_tensors_file (structure, names, "
        "shapes, dtype, finite values) as the server runs on every upload.",
        "JSON is measured on the q,v adapter only (it takes seconds per million parameters).",
    ]
    return write_results(NAME, TITLE, out_dir, quick=quick,
                         params={"sizes": [s.label for s, _ in sizes], "repeat": repeat, "json_repeat": json_repeat},
                         tables=[table], targets=targets, notes=notes, data=raw)


def main(argv: list[str] | None = None) -> None:
    benchmark_main(NAME, __doc__, run, argv)


if __name__ == "__main__":
    main()
