"""The errors a client can cause or meet, each with its HTTP status. Raised by codecs, the batcher
and the routes; one handler in `app.py` turns them into JSON `{"detail": ...}`."""

from __future__ import annotations


class ServiceError(Exception):
    status_code = 500

    def __init__(self, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.headers = headers or {}


class BadInput(ServiceError):
    """The content is wrong: not an image, wrong shape, values out of range, ..."""
    status_code = 422


class UnsupportedMediaType(ServiceError):
    status_code = 415


class TooLarge(ServiceError):
    status_code = 413


class Overloaded(ServiceError):
    status_code = 503

    def __init__(self, detail: str, retry_after_s: int = 1) -> None:
        super().__init__(detail, {"Retry-After": str(max(1, retry_after_s))})


class NotReady(ServiceError):
    status_code = 503


class ArtifactError(Exception):
    """The artifact cannot be served: missing, corrupt, or of an unknown format."""
