"""Run the Flask app under gunicorn from Python, with options taken from ServerArguments."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from gunicorn.app.base import BaseApplication

# Server hooks gunicorn calls in the master (e.g. child_exit(server, worker) after a worker died).
HOOKS = frozenset({"on_starting", "when_ready", "pre_fork", "post_fork", "post_worker_init", "worker_exit",
                   "child_exit", "on_exit", "worker_abort", "worker_int"})


class GunicornServer(BaseApplication):
    """A gunicorn application whose workers each build the app with ``app_factory``.

    ``options`` are gunicorn settings (``None`` values keep gunicorn's default); ``hooks`` maps
    server-hook names (``child_exit``, ``post_fork``, ...) to callables.
    """

    def __init__(self, app_factory: Callable[[], Any], options: dict[str, Any],
                 hooks: Mapping[str, Callable[..., Any]] | None = None):
        unknown = sorted(set(hooks or {}) - HOOKS)
        if unknown:
            raise ValueError(f"unknown gunicorn hooks {unknown}; known: {sorted(HOOKS)}")
        self.app_factory = app_factory
        self.options = {**options, **(hooks or {})}
        super().__init__()

    def load_config(self) -> None:
        for key, value in self.options.items():
            if value is not None and key in self.cfg.settings:
                self.cfg.set(key, value)

    def load(self):
        return self.app_factory()
