"""Exceptions that carry a reason a user can act on.

Ingest sorts every file into indexed, skipped (not for us: by design) or failed (should have worked, did not).
The reason codes below are what the build summary and the catalog's file ledger show.
"""

from __future__ import annotations

SKIP_REASONS = {
    "not-an-image": "not an image (non-DICOM file, or DICOM without pixel data such as a report)",
    "not-chest-radiograph": "not a chest radiograph (modality or body part)",
    "unsupported": "image kind or encoding medsim cannot use (e.g. multi-frame, unknown transfer syntax)",
    "duplicate-sop-uid": "SOP Instance UID already indexed or seen earlier in this run",
    "duplicate-pixels": "decoded pixels identical to an indexed image or one read earlier in this run "
    "(build-index --skip-duplicates)",
}

FAIL_REASONS = {
    "corrupt": "truncated or malformed file",
    "decode-error": "pixel data could not be decoded by pydicom or SimpleITK",
    "too-large": "image larger than the configured limits (pixels; inflated size of a deflated file)",
    "unreadable": "file or folder could not be read (permissions, I/O error)",
}


class MedsimError(Exception):
    """Base class: an error with a message meant for the user, not a stack trace."""


MAX_DETAIL = 300


def short(text: str) -> str:
    """Keep details one readable line: decoder errors can embed whole pixel buffers."""
    text = " ".join(str(text).split())
    return text if len(text) <= MAX_DETAIL else text[: MAX_DETAIL - 3] + "..."


class SkipFile(MedsimError):
    """The file is not something medsim indexes; not an error."""

    def __init__(self, reason: str, detail: str = ""):
        assert reason in SKIP_REASONS, reason
        self.reason = reason
        self.detail = short(detail)
        super().__init__(f"{reason}: {self.detail}" if detail else reason)


class ReadFailure(MedsimError):
    """The file should have been readable but was not."""

    def __init__(self, reason: str, detail: str = ""):
        assert reason in FAIL_REASONS, reason
        self.reason = reason
        self.detail = short(detail)
        super().__init__(f"{reason}: {self.detail}" if detail else reason)


class ModelMismatch(MedsimError):
    """Vectors, an index or a bundle come from a different model than expected."""


class IndexFormatError(MedsimError):
    """An index directory is missing, incomplete or of an unknown format."""
