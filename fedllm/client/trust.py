"""What the client accepts from a server it does not trust: every served value it acts on is checked here.

A malicious server, or a man in the middle, must not be able to make the client write outside its
output directory, read an unbounded body, allocate absurd memory, train with settings the data owner
did not allow, or send the data owner's token in cleartext. Served strings never become paths: the
client names its files itself (from an integer version and a sha256 checked to be 64 hex digits).
Each refusal is one line, an :class:`UntrustedServerError` or an :class:`InsecureTransportError`
(both ``ValueError``), which ``client_http.py`` reports and exits 2 on.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from ..config import FEDERATION_ARGUMENT_NAMES, ClientArguments

SHA256_HEX = re.compile(r"[0-9a-f]{64}")
VERSION_DIGITS = re.compile(r"[0-9]{1,9}")  # a global version or round number: 0 .. 999,999,999
MAX_ROUND = 10**9 - 1
MAX_TENSOR_DIMS = 4
MAX_DIM = 1 << 31
PHASES = frozenset({"waiting", "training", "aggregating", "finished"})

# The most a served global adapter may take: a safetensors header (one short JSON entry per tensor beyond
# its name, plus a small metadata map) and each tensor at 4 bytes an element (float32, the widest wire dtype).
HEADER_BASE_BYTES = 1 << 20
HEADER_BYTES_PER_TENSOR = 256
MAX_ELEMENT_BYTES = 4


class UntrustedServerError(ValueError):
    """The server sent something this client refuses to act on."""


class InsecureTransportError(ValueError):
    """The client would send its token over the network in cleartext."""


# --- the server's address ---
def check_server_url(url: str) -> None:
    """Refuse a ``--server_url`` that is not ``http://HOST[:PORT]`` or ``https://HOST[:PORT]``."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        hint = f"; did you mean http://{url}?" if "://" not in url else ""
        raise ValueError(f"--server_url {url!r} is not an http:// or https:// URL{hint}")


def is_loopback(host: str) -> bool:
    """Whether ``host`` is this machine: localhost, 127.0.0.0/8 or ::1."""
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_token_transport(url: str, has_token: bool, allow_insecure_http: bool) -> None:
    """Refuse to send a token over plain HTTP to another machine, unless the data owner allowed it."""
    parts = urlsplit(url)
    if not has_token or parts.scheme != "http" or is_loopback(parts.hostname or "") or allow_insecure_http:
        return
    raise InsecureTransportError(
        f"refusing to send the token in cleartext to {parts.hostname} over http://: use https:// (with --ca_bundle "
        "for a self-signed certificate), or pass --allow_insecure_http on a network you trust")


# --- headers of GET /v1/global ---
def parse_etag(value: str | None) -> str:
    """The sha256 an ETag names: exactly 64 lowercase hex digits, in quotes or not."""
    text = (value or "").strip()
    if len(text) >= 2 and text[0] == text[-1] == '"':
        text = text[1:-1]
    if not SHA256_HEX.fullmatch(text):
        raise UntrustedServerError(
            f"the server's ETag {(value or '')[:100]!r} is not a sha256 (64 lowercase hex digits); refusing the "
            "download")
    return text


def parse_version(value: str | None) -> int:
    """The global version of ``X-FedLLM-Version``: a decimal integer from 0 to MAX_ROUND."""
    if not VERSION_DIGITS.fullmatch((value or "").strip()):
        raise UntrustedServerError(
            f"the server's X-FedLLM-Version {(value or '')[:100]!r} is not an integer from 0 to {MAX_ROUND}")
    return int(value)


# --- GET /v1/config ---
def check_server_config(config: Any, args: ClientArguments) -> None:
    """Refuse a ``/v1/config`` answer that is malformed or asks for more than this data owner allows."""
    if not isinstance(config, dict):
        raise UntrustedServerError("the server's /v1/config is not a JSON object")
    for key, kind in (("federation", dict), ("federation_id", str), ("model_fingerprint", str), ("lora_config", dict),
                      ("adapter", dict), ("upload_tensors", dict), ("round_config", dict)):
        if not isinstance(config.get(key), kind):
            raise UntrustedServerError(f"the server's /v1/config has no valid {key!r}")
    federation = config["federation"]
    unknown = sorted(set(federation) - set(FEDERATION_ARGUMENT_NAMES))
    if unknown:
        raise UntrustedServerError(f"the server's federation settings name options this client does not know: "
                                   f"{[str(k)[:40] for k in unknown[:5]]}; is the server newer than this client?")
    if not isinstance(federation.get("model_name_or_path"), str) or not federation["model_name_or_path"]:
        raise UntrustedServerError("the server's federation settings name no base model")
    num_rounds = federation.get("num_rounds")
    if type(num_rounds) is not int or not 1 <= num_rounds <= MAX_ROUND:
        raise UntrustedServerError(f"the server's num_rounds {num_rounds!r} is not an integer from 1 to {MAX_ROUND}")
    rank = config["lora_config"].get("r")
    if type(rank) is not int or not 1 <= rank <= args.max_lora_rank:
        raise UntrustedServerError(f"the server's LoRA rank {rank!r} is not an integer from 1 to --max_lora_rank "
                                   f"{args.max_lora_rank}")
    adapter = _check_spec(config["adapter"], "adapter")
    uploads = _check_spec(config["upload_tensors"], "upload_tensors")
    if not adapter:
        raise UntrustedServerError("the server's adapter has no tensors")
    if any(uploads.get(name) != shape for name, shape in adapter.items()):
        raise UntrustedServerError("the server's upload_tensors do not include its adapter's tensors and shapes")
    # Extras (SCAFFOLD's control.*) mirror adapter tensors: at most one each, each of an adapter tensor's shape.
    extras = {name: shape for name, shape in uploads.items() if name not in adapter}
    adapter_shapes = {tuple(shape) for shape in adapter.values()}
    if len(extras) > len(adapter) or any(tuple(shape) not in adapter_shapes for shape in extras.values()):
        raise UntrustedServerError("the server's upload_tensors hold extras that do not mirror its adapter's tensors")
    check_round_config(config, args)


def _check_spec(spec: Mapping[Any, Any], what: str) -> dict[str, list[int]]:
    """``spec`` (tensor name -> shape) when every name is a string and every shape a short list of positive ints."""
    for name, shape in spec.items():
        if (not isinstance(name, str) or not isinstance(shape, list) or not 1 <= len(shape) <= MAX_TENSOR_DIMS
                or not all(type(d) is int and 1 <= d <= MAX_DIM for d in shape)):
            raise UntrustedServerError(f"the server's {what} has an invalid tensor {str(name)[:80]!r}: {str(shape)[:80]}")
    return dict(spec)


def check_round_config(config: Any, args: ClientArguments) -> tuple[float, int]:
    """The round's ``(learning_rate, max_steps)`` from a ``/v1/config`` answer, refused unless positive, finite
    and within this client's bounds."""
    round_config = config.get("round_config") if isinstance(config, dict) else None
    if not isinstance(round_config, dict):
        raise UntrustedServerError("the server's /v1/config has no valid 'round_config'")
    learning_rate, max_steps = round_config.get("learning_rate"), round_config.get("max_steps")
    if type(max_steps) is not int or not 1 <= max_steps <= args.max_local_steps:
        raise UntrustedServerError(f"the server asks for {str(max_steps)[:40]} local steps; this client takes an "
                                   f"integer from 1 to --max_local_steps {args.max_local_steps}")
    if (type(learning_rate) not in (int, float) or not math.isfinite(learning_rate)
            or not 0 < learning_rate <= args.max_learning_rate):
        raise UntrustedServerError(f"the server asks for learning rate {str(learning_rate)[:40]}; this client takes "
                                   f"a finite one above 0 and at most --max_learning_rate {args.max_learning_rate:g}")
    return float(learning_rate), max_steps


# --- GET /v1/round ---
def check_round_status(status: Any) -> None:
    """Refuse a ``/v1/round`` answer whose fields the client acts on are malformed."""
    if not isinstance(status, dict):
        raise UntrustedServerError("the server's /v1/round is not a JSON object")
    round_number = status.get("round")
    if type(round_number) is not int or not 0 <= round_number <= MAX_ROUND:
        raise UntrustedServerError(f"the server's round {str(round_number)[:40]!r} is not an integer from 0 to "
                                   f"{MAX_ROUND}")
    if status.get("phase") not in PHASES:
        raise UntrustedServerError(f"the server's phase {str(status.get('phase'))[:40]!r} is not one of "
                                   f"{sorted(PHASES)}")
    if type(status.get("selected")) is not bool or type(status.get("submitted")) is not bool:
        raise UntrustedServerError("the server's /v1/round does not say whether this client is selected and submitted")


def download_limit(config: Any) -> int:
    """The largest global adapter body to accept, in bytes, from a ``/v1/config`` answer.

    The server serves the adapter plus its algorithm's extras (SCAFFOLD's ``control.*``), all of which are
    among ``upload_tensors``: a safetensors header plus every one of them in float32 bounds the body.
    """
    if not isinstance(config, dict) or not isinstance(config.get("upload_tensors"), dict):
        raise UntrustedServerError("the server's /v1/config has no valid 'upload_tensors'")
    tensors = _check_spec(config["upload_tensors"], "upload_tensors")
    header = HEADER_BASE_BYTES + sum(len(name.encode()) + HEADER_BYTES_PER_TENSOR for name in tensors)
    return header + sum(math.prod(shape) for shape in tensors.values()) * MAX_ELEMENT_BYTES


def check_clip_norm(config: Any) -> float | None:
    """``--dp client``: the round's clip norm the delta must keep to (a finite number > 0), else None."""
    federation = config.get("federation", {}) if isinstance(config, dict) else {}
    if federation.get("dp") != "client":
        return None
    clip = config.get("round_config", {}).get("dp_clip_norm")
    if isinstance(clip, bool) or not isinstance(clip, (int, float)) or not math.isfinite(clip) or clip <= 0:
        raise UntrustedServerError(f"the server asks to clip deltas to {clip!r}: not a finite number > 0")
    return float(clip)
