"""The errors an upload check raises (domain errors: the API maps them to 422 and 413)."""

from __future__ import annotations

from core.errors import DomainError


class InvalidUpload(DomainError):
    """The upload cannot be used; the message names the member, line or column.

    Attributes:
        member: the archive member at fault, or None.
    """

    code = "invalid_upload"

    def __init__(self, message: str, field: str | None = "file", member: str | None = None) -> None:
        super().__init__(message, field)
        self.member = member


class UploadTooLarge(DomainError):
    """The upload, or what it unpacks to, is over a cap.

    Attributes:
        limit: the cap (bytes, or a count of archive members when ``what`` is ``members``).
        what: ``"bytes"`` or ``"members"``.
    """

    code = "too_large"

    def __init__(
        self, message: str, limit: int, what: str = "bytes", field: str | None = "file"
    ) -> None:
        super().__init__(message, field)
        self.limit = limit
        self.what = what
