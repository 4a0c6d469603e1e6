"""A request the server refuses, shared by the server's modules."""

from __future__ import annotations

from collections.abc import Mapping


class ApiError(Exception):
    """A request the server refuses: its status, one line, and any headers."""

    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, dict(headers or {})
