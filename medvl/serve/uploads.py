"""Images in requests: data URIs only, size-limited, decoded by medvl's guarded readers.

The server never fetches a URL and never opens a path named in a request: an ``image_url``
must be ``data:<type>;base64,<payload>`` with type image/png, image/jpeg or
application/dicom. The payload is size-checked before and after base64 decoding, written to
a file the server itself creates in its private temporary folder, and opened with
:func:`medvl.data.imageio.load_medical`, whose header-based guards refuse decompression
bombs before decoding (pixel limit from the server config), then deleted at once: the
request carries the decoded image (``Media.array``), nothing stays on disk. Every failure is a
:class:`RequestError` with an HTTP status and a message that says what to send instead.
"""

from __future__ import annotations

import base64
import binascii
import os
import tempfile
from pathlib import Path

from medvl.data.schema import Media
from medvl.errors import MedvlUserError

SUFFIX = {"image/png": ".png", "image/jpeg": ".jpg", "image/jpg": ".jpg", "application/dicom": ".dcm",
          "image/dicom": ".dcm"}


class RequestError(Exception):
    def __init__(self, status: int, message: str, code: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


class UploadStore:
    """Decoded request images as files in a private folder, removed when the request ends."""

    def __init__(self, max_bytes: int, max_pixels: int):
        self.dir = Path(tempfile.mkdtemp(prefix="medvl-serve-"))
        os.chmod(self.dir, 0o700)
        self.max_bytes = max_bytes
        self.max_pixels = max_pixels

    def decode(self, url: str) -> tuple[Media, object]:
        """A data URI -> (Media pointing at the server's own file, the decoded MedicalImage)."""
        from medvl.data.imageio import load_medical
        if not isinstance(url, str) or not url.startswith("data:"):
            raise RequestError(400, "image_url must be a data: URI (data:image/png;base64,...); this server never "
                                    "fetches URLs or reads file paths")
        head, sep, payload = url[5:].partition(",")
        if not sep or ";base64" not in head:
            raise RequestError(400, "image data URI must be base64-encoded: data:<type>;base64,<data>")
        mime = head.split(";")[0].strip().lower()
        if mime not in SUFFIX:
            raise RequestError(415, f"image type {mime or '(none)'!r} is not accepted; send image/png, image/jpeg "
                                    "or application/dicom")
        if len(payload) > self.max_bytes * 4 // 3 + 4:
            raise RequestError(413, f"image larger than the server's limit of {self.max_bytes} bytes")
        try:
            raw = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise RequestError(400, "image data is not valid base64") from None
        if len(raw) > self.max_bytes:
            raise RequestError(413, f"image larger than the server's limit of {self.max_bytes} bytes")
        fd, name = tempfile.mkstemp(suffix=SUFFIX[mime], dir=self.dir)
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
        try:
            img = load_medical(name, max_pixels=self.max_pixels)
        except MedvlUserError as e:
            msg = str(e).replace(name, "the uploaded image")
            status = 413 if "over the limit" in msg or "decompression bomb" in msg else 400
            raise RequestError(status, f"cannot use the image: {msg}") from None
        except Exception as e:  # noqa: BLE001 - any decoder failure is the client's corrupt file
            raise RequestError(400, f"cannot decode the image ({type(e).__name__})") from None
        finally:
            os.unlink(name)
        return Media(None, modality=getattr(img, "modality", None), array=img), img

    def release(self, media: Media) -> None:
        """Drop the decoded pixels (the file is already gone)."""
        media.array = None
