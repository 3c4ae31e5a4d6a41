"""Global versions and their export: the files a round's aggregation produces, and reading them back.

Version v is two immutable files written tmp → fsync → rename before any row points to them:
``globals/v00000v.safetensors`` (what clients download: the adapter in the wire dtype plus the
algorithm's served extras, e.g. SCAFFOLD's ``control.`` c) and ``globals/v00000v.state.safetensors``
(the float32 master copy of the adapter and the algorithm's state, from which the next round
aggregates bit for bit). PEFT adapter directories (``adapters/final``, ``adapters/round_N``) are the
export that ``PeftModel.from_pretrained`` loads.

With a quantizer ``--update_compression`` (int8, nf4, fp4) a version has a third file, the served global quantized
with the same codec from the float32 master copy (``globals/v00000v.compressed.safetensors``, what
``GET /v1/global?encoding=compressed`` sends), and its sha256, size and file format in ``v00000v.compressed.json``:
both written atomically, file first, before any row points to the version, so the ETag is computed once per
version (and once more if a server with another format serves it).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..adapter import save_peft_adapter
from ..algorithms import FedAlgorithm
from ..algorithms.base import Tensors
from ..compression.codecs import Codec
from ..compression.updates import COMPRESSED_FORMAT, encode_global
from ..faults import fault_point
from ..fsutil import atomic_write, atomic_write_bytes, fsync_dir, fsync_tree
from ..wire import DTYPE_CODE, WIRE_DTYPES, TensorFile, sha256_file
from .errors import InvalidEncoding
from .store import GlobalRow, Store, UpdateRow

STATE_GLOBAL_PREFIX = "global."  # fp32 master copy of the adapter inside the state file
STATE_ALGO_PREFIX = "algo."
# Settings of the served LoRA config that a PEFT adapter directory records.
PEFT_DIR_KEYS = frozenset({"r", "lora_alpha", "lora_dropout", "target_modules", "bias", "task_type",
                           "base_model_name_or_path"})
GLOBAL_EXPORT_FILE = "global.safetensors"  # the export of an algorithm whose global is no LoRA adapter
KEPT_VERSIONS = 2  # global versions kept on disk: the newest and the one a late client may still be training on
ENCODINGS = ("dense", "compressed")  # of GET /v1/global?encoding=


@dataclass(frozen=True)
class ServedGlobal:
    """One file ``GET /v1/global`` sends: a version's dense or compressed global, its sha256 (the ETag) and size."""

    version: int
    sha256: str
    path: str
    size: int


def compressed_paths(store: Store, version: int) -> tuple[Path, Path]:
    """(the compressed global of ``version``, the JSON that records its sha256 and size)."""
    dense = store.global_path(version)
    return dense.with_suffix(".compressed.safetensors"), dense.with_suffix(".compressed.json")


def write_compressed(store: Store, codec: Codec, algorithm: FedAlgorithm, version: int, adapter: Tensors,
                     state: Tensors) -> ServedGlobal:
    """Write ``C(g)`` of ``version``, the served tensors quantized from the float32 master copy (idempotently: the
    encoding is deterministic), then its record."""
    served = {**adapter, **algorithm.global_extras(state)}
    path, record = compressed_paths(store, version)
    atomic_write_bytes(path, encode_global(codec, served))
    row = ServedGlobal(version, sha256_file(path), str(path), path.stat().st_size)
    atomic_write_bytes(record, json.dumps({"sha256": row.sha256, "size": row.size,
                                           "format": COMPRESSED_FORMAT}).encode())
    return row


class FileUpdate:
    """An accepted update read lazily from its safetensors file (one tensor at a time).

    Positioned reads, not a memory map: a tensor is freed once the algorithm drops it, so the
    server's resident memory does not grow with the number of updates in a round.
    """

    def __init__(self, row: UpdateRow, path: str | Path | None = None):
        self.client_id = row.client_id
        self.num_samples = row.num_samples
        self.metrics = row.metrics  # what the client reported with it (e.g. DP's dp_unclipped)
        self._file = TensorFile(path or row.path)

    def get(self, name: str) -> torch.Tensor:
        return self._file.get(name).to(torch.float32)

    def read_into(self, name: str, out: torch.Tensor | None) -> torch.Tensor:
        """``get(name)``, read into ``out`` (a float32 buffer of its shape) when the file holds float32."""
        return self._file.get(name, out=out).to(torch.float32)

    def names(self):
        return self._file.keys()


def write_version(store: Store, wire_dtype: str, algorithm: FedAlgorithm, version: int, adapter: Tensors,
                  state: Tensors, codec: Codec | None = None) -> GlobalRow:
    """Write the served global and the state file of ``version`` (atomically, idempotently); with ``codec`` (the
    federation's quantizer, :func:`~fedllm.compression.codecs.global_codec`) its compressed global too."""
    dtype = WIRE_DTYPES[DTYPE_CODE[wire_dtype]][0]
    served = {k: v.to(dtype).contiguous() for k, v in adapter.items()}
    served.update({k: v.to(dtype).contiguous() for k, v in algorithm.global_extras(state).items()})
    # One metadata key only: safetensors writes a metadata map in hash order, so two keys would make the
    # bytes (and the sha256 served as ETag) differ between two writes of the same version.
    gpath = atomic_write(store.global_path(version), lambda tmp: save_file(served, tmp, metadata={"format": "pt"}))
    fault_point("aggregate.global_written")
    state_tensors = {STATE_GLOBAL_PREFIX + k: v.contiguous() for k, v in adapter.items()}
    state_tensors.update({STATE_ALGO_PREFIX + k: v.contiguous() for k, v in state.items()})
    spath = atomic_write(store.state_path(version), lambda tmp: save_file(state_tensors, tmp))
    if codec is not None:
        write_compressed(store, codec, algorithm, version, adapter, state)
    digest = sha256_file(gpath)  # in chunks: never a second copy of the adapter in memory
    return GlobalRow(version, digest, store.relative(gpath), store.relative(spath), gpath.stat().st_size, time.time())


def load_state(state_path: str | Path) -> tuple[Tensors, Tensors]:
    """(adapter, algorithm state) of a state file written by :func:`write_version`."""
    adapter: Tensors = {}
    state: Tensors = {}
    with safe_open(str(state_path), framework="pt") as f:
        for key in f.keys():
            if key.startswith(STATE_GLOBAL_PREFIX):
                adapter[key[len(STATE_GLOBAL_PREFIX):]] = f.get_tensor(key)
            else:
                state[key[len(STATE_ALGO_PREFIX):]] = f.get_tensor(key)
    return adapter, state


class GlobalVersions:
    """The global versions of one federation: the newest, writing the next one, exporting and pruning."""

    def __init__(self, store: Store, wire_dtype: str, algorithm: FedAlgorithm, lora_config: Mapping[str, Any],
                 output_dir: Path, codec: Codec | None = None):
        self.store = store
        self.wire_dtype = wire_dtype
        self.algorithm = algorithm
        self.lora_config = lora_config
        self.output_dir = output_dir
        self.codec = codec  # the quantizer of the compressed global, or None: only the dense one is served

    def latest(self) -> GlobalRow:
        """The newest global version, with its file paths resolved against ``state_dir``."""
        row = self.store.latest_global(self.store.read())
        return GlobalRow(row.version, row.sha256, str(self.store.resolve(row.path)),
                         str(self.store.resolve(row.state_path)), row.size, row.created_at)

    def served(self, encoding: str | None) -> ServedGlobal:
        """The newest global as ``GET /v1/global?encoding=`` sends it: ``dense`` (the default) or ``compressed``."""
        encoding = "dense" if encoding is None else encoding  # present but empty is a bad value, as the schema says
        if encoding not in ENCODINGS:
            raise InvalidEncoding(f"encoding must be one of {list(ENCODINGS)}, got {encoding[:40]!r}")
        if encoding == "compressed" and self.codec is None:
            raise InvalidEncoding("this federation serves its global dense only: encoding=compressed needs "
                                  "--update_compression int8, nf4 or fp4")
        row = self.latest()
        if encoding == "dense":
            return ServedGlobal(row.version, row.sha256, row.path, row.size)
        path, record = compressed_paths(self.store, row.version)
        try:
            found = json.loads(record.read_text())
        except FileNotFoundError:  # a version written before this server served compressed globals
            found = {}
        if found.get("format") == COMPRESSED_FORMAT:
            return ServedGlobal(row.version, found["sha256"], str(path), found["size"])
        adapter, state = self.load(row)  # none yet, or an older layout (per-tensor parts): written afresh
        return write_compressed(self.store, self.codec, self.algorithm, row.version, adapter, state)

    def load(self, row: GlobalRow) -> tuple[Tensors, Tensors]:
        return load_state(self.store.resolve(row.state_path))

    def write(self, version: int, adapter: Tensors, state: Tensors) -> GlobalRow:
        return write_version(self.store, self.wire_dtype, self.algorithm, version, adapter, state, self.codec)

    def export(self, adapter: Mapping[str, torch.Tensor], name: str) -> Path:
        """Write ``adapter`` as the PEFT directory ``output_dir/name`` (or, for an algorithm whose global is no LoRA
        adapter, as ``output_dir/name/global.safetensors``), replacing it atomically."""
        from peft import LoraConfig

        settings = {k: v for k, v in self.lora_config.items() if k in PEFT_DIR_KEYS}
        target = self.output_dir / name
        tmp = self.output_dir / f".{name}.{os.getpid()}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        if self.algorithm.exports_peft_adapter:
            save_peft_adapter(tmp, adapter, LoraConfig(**settings))
        else:  # e.g. FedKSeed's scalars and seeds: with the base model, they are the model (fedllm.client.kseed)
            tmp.mkdir(parents=True)
            save_file({k: v.contiguous() for k, v in adapter.items()}, str(tmp / GLOBAL_EXPORT_FILE))
        fsync_tree(tmp)  # durable before it replaces the previous export
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
        fsync_dir(self.output_dir)
        return target

    def prune(self, version: int) -> None:
        """Drop the consumed updates of round ``version`` and global versions no client can still need."""
        shutil.rmtree(self.store.update_dir(version), ignore_errors=True)
        for old in range(max(0, version - 2 - KEPT_VERSIONS), version + 1 - KEPT_VERSIONS):
            self.store.global_path(old).unlink(missing_ok=True)
            self.store.state_path(old).unlink(missing_ok=True)
            for path in compressed_paths(self.store, old):
                path.unlink(missing_ok=True)
