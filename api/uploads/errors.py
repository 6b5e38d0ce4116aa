"""The errors an upload check raises; the API's JSON error handlers answer them as they are."""

from __future__ import annotations

from api.errors import DomainError


class InvalidUpload(DomainError):
    """The upload cannot be used (422); the message names the member, line or column.

    Attributes:
        member: the archive member at fault, or None.
    """

    status = 422
    code = "invalid_upload"

    def __init__(self, message: str, field: str | None = "file", member: str | None = None) -> None:
        super().__init__(message, field)
        self.member = member


class UploadTooLarge(DomainError):
    """The upload, or what it unpacks to, is over a cap (413).

    Attributes:
        limit: the cap (bytes, or a count of archive members when ``what`` is ``members``).
        what: ``"bytes"`` or ``"members"``.
    """

    status = 413
    code = "too_large"

    def __init__(
        self, message: str, limit: int, what: str = "bytes", field: str | None = "file"
    ) -> None:
        super().__init__(message, field)
        self.limit = limit
        self.what = what
