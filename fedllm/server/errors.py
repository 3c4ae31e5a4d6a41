"""The one exception type the server's service layer raises; the Flask app turns it into JSON."""

from __future__ import annotations


class ApiError(Exception):
    """A request that cannot be served: ``{"error": error, "detail": detail}`` with ``status``."""

    def __init__(self, status: int, error: str, detail: str = ""):
        super().__init__(f"{status} {error}: {detail}")
        self.status = status
        self.error = error
        self.detail = detail

    def to_json(self) -> dict[str, str]:
        return {"error": self.error, "detail": self.detail}
