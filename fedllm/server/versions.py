"""Global versions and their export: the files a round's aggregation produces, and reading them back.

Version v is two immutable files written tmp → fsync → rename before any row points to them:
``globals/v00000v.safetensors`` (what clients download: the adapter in the wire dtype plus the
algorithm's served extras, e.g. SCAFFOLD's ``control.`` c) and ``globals/v00000v.state.safetensors``
(the float32 master copy of the adapter and the algorithm's state, from which the next round
aggregates bit for bit). PEFT adapter directories (``adapters/final``, ``adapters/round_N``) are the
export that ``PeftModel.from_pretrained`` loads.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..adapter import save_peft_adapter
from ..algorithms import FedAlgorithm
from ..algorithms.base import Tensors
from ..faults import fault_point
from ..fsutil import atomic_write, fsync_dir, fsync_tree
from ..wire import DTYPE_CODE, WIRE_DTYPES, TensorFile, sha256_file
from .store import GlobalRow, Store, UpdateRow

STATE_GLOBAL_PREFIX = "global."  # fp32 master copy of the adapter inside the state file
STATE_ALGO_PREFIX = "algo."
# Settings of the served LoRA config that a PEFT adapter directory records.
PEFT_DIR_KEYS = frozenset({"r", "lora_alpha", "lora_dropout", "target_modules", "bias", "task_type",
                           "base_model_name_or_path"})
GLOBAL_EXPORT_FILE = "global.safetensors"  # the export of an algorithm whose global is no LoRA adapter
KEPT_VERSIONS = 2  # global versions kept on disk: the newest and the one a late client may still be training on


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
                  state: Tensors) -> GlobalRow:
    """Write the served global and the state file of ``version`` (atomically, idempotently)."""
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
                 output_dir: Path):
        self.store = store
        self.wire_dtype = wire_dtype
        self.algorithm = algorithm
        self.lora_config = lora_config
        self.output_dir = output_dir

    def latest(self) -> GlobalRow:
        """The newest global version, with its file paths resolved against ``state_dir``."""
        row = self.store.latest_global(self.store.read())
        return GlobalRow(row.version, row.sha256, str(self.store.resolve(row.path)),
                         str(self.store.resolve(row.state_path)), row.size, row.created_at)

    def load(self, row: GlobalRow) -> tuple[Tensors, Tensors]:
        return load_state(self.store.resolve(row.state_path))

    def write(self, version: int, adapter: Tensors, state: Tensors) -> GlobalRow:
        return write_version(self.store, self.wire_dtype, self.algorithm, version, adapter, state)

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
