"""Run the Flask app under gunicorn from Python, with options taken from ServerArguments."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gunicorn.app.base import BaseApplication


class GunicornServer(BaseApplication):
    """A gunicorn application whose workers each build the app with ``app_factory``."""

    def __init__(self, app_factory: Callable[[], Any], options: dict[str, Any]):
        self.app_factory = app_factory
        self.options = options
        super().__init__()

    def load_config(self) -> None:
        for key, value in self.options.items():
            if value is not None and key in self.cfg.settings:
                self.cfg.set(key, value)

    def load(self):
        return self.app_factory()
