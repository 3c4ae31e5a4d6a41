"""The cryptographic primitives of SecAgg+, all from the ``cryptography`` package (OpenSSL underneath).

* key agreement: X25519; the shared secret goes through HKDF-SHA256 with an ``info`` naming its purpose
  (share encryption or pairwise mask) and the round's context, so one Diffie-Hellman value never serves
  two purposes or two rounds;
* authenticated encryption of the Shamir shares: AES-256-GCM, a fresh 96-bit random nonce per message, the
  associated data binding sender, receiver, round, attempt and stage (a share replayed into another round or
  to another receiver fails to decrypt);
* mask PRG: the AES-128-CTR keystream of a seed (a PRF in counter mode: a cryptographic PRG, 128-bit security
  like X25519's), read as little-endian unsigned integers of the ring's storage width.
"""

from __future__ import annotations

import os

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

KEY_BYTES = 32
NONCE_BYTES = 12
RAW = serialization.Encoding.Raw


class AuthenticationFailed(ValueError):
    """A ciphertext that was not produced by the claimed sender for this receiver, round and stage."""


def generate_private_key() -> bytes:
    return X25519PrivateKey.generate().private_bytes(RAW, serialization.PrivateFormat.Raw,
                                                     serialization.NoEncryption())


def public_key(private: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes(RAW, serialization.PublicFormat.Raw)


def check_public_key(public: bytes) -> None:
    """ValueError unless ``public`` is a 32-byte X25519 public key of full order (an exchange with a fresh key
    does not give the all-zero value), so every later agreement with it succeeds."""
    if not isinstance(public, bytes) or len(public) != KEY_BYTES:
        raise ValueError(f"an X25519 public key is {KEY_BYTES} bytes")
    X25519PrivateKey.generate().exchange(X25519PublicKey.from_public_bytes(public))


def agree(private: bytes, peer_public: bytes, info: bytes) -> bytes:
    """HKDF-SHA256(X25519(private, peer_public), info): 32 bytes both sides compute alike.

    ValueError when the exchange yields the all-zero value (a low-order peer key).
    """
    shared = X25519PrivateKey.from_private_bytes(private).exchange(X25519PublicKey.from_public_bytes(peer_public))
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(shared)


def encrypt(key: bytes, plaintext: bytes, associated_data: bytes) -> bytes:
    """nonce ‖ AES-256-GCM(key, nonce, plaintext, associated_data)."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, associated_data)


def decrypt(key: bytes, ciphertext: bytes, associated_data: bytes) -> bytes:
    """The plaintext of :func:`encrypt`; :class:`AuthenticationFailed` for anything it did not produce."""
    if len(ciphertext) < NONCE_BYTES + 16:
        raise AuthenticationFailed("ciphertext too short")
    try:
        return AESGCM(key).decrypt(ciphertext[:NONCE_BYTES], ciphertext[NONCE_BYTES:], associated_data)
    except InvalidTag:
        raise AuthenticationFailed("the share does not authenticate") from None


def keystreams(seeds: list[bytes], length: int, dtype: np.dtype, chunk: int = 1 << 16):
    """For each chunk of ``chunk`` elements: the list of every seed's next ``chunk`` pseudorandom integers.

    The PRG of a seed is the AES-128-CTR keystream under its first 16 bytes (zero nonce: each seed serves one
    mask of one round, HKDF binds it to the round), read as little-endian unsigned integers of ``dtype``. All
    seeds advance together, a cache-sized chunk at a time, written into reused buffers (no 34 MB allocation per
    mask): yields ``(start, [array per seed])`` with arrays valid until the next step.
    """
    dtype = np.dtype(dtype).newbyteorder("<")
    encryptors = [Cipher(algorithms.AES(seed[:16]), modes.CTR(bytes(16))).encryptor() for seed in seeds]
    zeros = bytes(chunk * dtype.itemsize)
    buffers = [bytearray(chunk * dtype.itemsize + 15) for _ in seeds]
    for start in range(0, length, chunk):
        count = min(chunk, length - start)
        nbytes = count * dtype.itemsize
        streams = []
        for encryptor, buffer in zip(encryptors, buffers, strict=True):
            encryptor.update_into(zeros[:nbytes], buffer)
            streams.append(np.frombuffer(buffer, dtype=dtype, count=count))
        yield start, streams


def prg(seed: bytes, length: int, dtype: np.dtype) -> np.ndarray:
    """``length`` pseudorandom unsigned integers of ``dtype`` from ``seed`` (the stream of :func:`keystreams`)."""
    out = np.empty(length, dtype=np.dtype(dtype))
    for start, (stream,) in keystreams([seed], length, dtype):
        out[start:start + stream.size] = stream
    return out
