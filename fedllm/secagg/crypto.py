"""The cryptographic primitives of SecAgg+, all from the ``cryptography`` package (OpenSSL underneath).

* key agreement: X25519; the shared secret goes through HKDF-SHA256 with an ``info`` naming its purpose
  (share encryption or pairwise mask) and the round's context, so one Diffie-Hellman value never serves
  two purposes or two rounds;
* authenticated encryption of the Shamir shares: AES-256-GCM, a fresh 96-bit random nonce per message, the
  associated data binding sender, receiver, round, attempt and stage (a share replayed into another round or
  to another receiver fails to decrypt);
* mask PRG: the AES-256-CTR keystream of a 32-byte seed (a PRF in counter mode: a cryptographic PRG), read as
  little-endian unsigned integers of the ring's storage width.
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
    """ValueError unless ``public`` is a 32-byte X25519 public key."""
    if not isinstance(public, bytes) or len(public) != KEY_BYTES:
        raise ValueError(f"an X25519 public key is {KEY_BYTES} bytes")
    X25519PublicKey.from_public_bytes(public)


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


def prg(seed: bytes, length: int, dtype: np.dtype) -> np.ndarray:
    """``length`` pseudorandom unsigned integers of ``dtype``: the AES-256-CTR keystream of ``seed``.

    Each seed is used for one mask of one round (HKDF binds it to the round), so a zero nonce is safe.
    """
    dtype = np.dtype(dtype)
    encryptor = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor()
    stream = encryptor.update(bytes(length * dtype.itemsize)) + encryptor.finalize()
    return np.frombuffer(stream, dtype=dtype.newbyteorder("<")).astype(dtype, copy=False)
