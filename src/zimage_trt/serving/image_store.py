"""The images behind `response_format: "url"`: kept in memory, for a bounded time, count and size.

An image is stored under a random name (128 bits: a link cannot be guessed) and served at
`GET /v1/images/files/NAME` behind the same API key as the rest of /v1. The least recently used (stored
or fetched) go first when the count or the bytes would pass their bounds; a link past its time (counted
from when the image was made) is gone (404). Nothing touches
the disk, and a restart forgets every link.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from .schema import OUTPUT_FORMATS

EXTENSIONS = {media_type: name for name, media_type in OUTPUT_FORMATS.items()}


@dataclass(frozen=True)
class StoredImage:
    data: bytes
    media_type: str
    expires: float  # time.monotonic() past which it is gone


class ImageStore:
    """An LRU of encoded images with a time to live; `max_images=0` keeps none (links are refused)."""

    def __init__(self, max_images: int = 64, ttl_s: float = 3600.0, max_bytes: int = 1 << 30, clock=time.monotonic):
        if isinstance(max_images, bool) or not isinstance(max_images, int) or max_images < 0:
            raise ValueError(f"max_images must be an int >= 0, got {max_images!r}")
        if not ttl_s > 0:
            raise ValueError(f"ttl_s must be > 0 seconds, got {ttl_s!r}")
        self.max_images, self.ttl_s, self.max_bytes, self.clock = max_images, float(ttl_s), int(max_bytes), clock
        self._images: OrderedDict[str, StoredImage] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.max_images > 0

    def put(self, data: bytes, media_type: str) -> str:
        """Keep `data`; returns its name (random, with the format's extension)."""
        if not self.enabled:
            raise RuntimeError("this image store keeps no images (max_images=0)")
        if len(data) > self.max_bytes:
            raise ValueError(f"an image of {len(data)} bytes is over the store's {self.max_bytes} bytes")
        name = f"{secrets.token_urlsafe(16)}.{EXTENSIONS.get(media_type, 'bin')}"
        with self._lock:
            self._expire_locked()
            while self._images and (len(self._images) >= self.max_images or self._bytes + len(data) > self.max_bytes):
                self._drop_locked(next(iter(self._images)))
            self._images[name] = StoredImage(data, media_type, self.clock() + self.ttl_s)
            self._bytes += len(data)
        return name

    def get(self, name: str) -> StoredImage | None:
        with self._lock:
            self._expire_locked()
            image = self._images.get(name)
            if image is not None:
                self._images.move_to_end(name)
            return image

    def __len__(self) -> int:
        with self._lock:
            self._expire_locked()
            return len(self._images)

    def _expire_locked(self) -> None:
        now = self.clock()
        for name in [n for n, image in self._images.items() if image.expires <= now]:
            self._drop_locked(name)

    def _drop_locked(self, name: str) -> None:
        self._bytes -= len(self._images.pop(name).data)
