"""API keys for `/v1/*`: `Authorization: Bearer <key>` (or the bare key, as Go accepts)."""

from __future__ import annotations

import hmac

from .validate import ApiError


def check_api_key(header: str | None, keys: tuple[str, ...]) -> None:
    """Raise 401 unless `header` carries one of `keys`.

    Every key is compared, in constant time, so the answer's timing says
    nothing about which key or how much of it matched.
    """
    if not header:
        raise ApiError(401, "Authorization header required")
    presented = header[7:] if header[:7].lower() == "bearer " else header
    presented_bytes = presented.strip().encode()
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(presented_bytes, key.encode())
    if not matched:
        raise ApiError(401, "Invalid API key")
