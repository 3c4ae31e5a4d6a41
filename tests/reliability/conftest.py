"""Fixtures shared by the reliability tests.

The API harness is tests/test_api.py's (``prepared``: an initialised state_dir whose round 1 is open with
every client joined; ``api``: a fresh copy of it behind the Flask test client), imported rather than copied.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from fedllm.server.auth import TokenRegistry, add_token

from ..test_api import CLIENTS, Api, api, make_api, prepared  # noqa: F401  (api and prepared are fixtures)


def copy_joined(prepared_root: Path, dest: Path) -> Path:
    """A private copy of the prepared state whose round 1 is open (all clients joined, nobody submitted)."""
    shutil.copytree(prepared_root / "joined", dest)
    return dest


def issue_tokens(path: Path) -> tuple[dict[str, str], str]:
    """A token for every client and the admin token, written to ``path`` (hashes only)."""
    tokens = {client: add_token(path, client) for client in CLIENTS}
    return tokens, add_token(path, None)


def secured_api(state_dir: Path, tokens_path: Path, **federation_kwargs) -> Api:
    """The API over ``state_dir`` with authentication on (``--auth_tokens tokens_path``)."""
    return make_api(state_dir, TokenRegistry(tokens_path), **federation_kwargs)
