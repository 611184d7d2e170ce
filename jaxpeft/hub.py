"""Whether the Hugging Face hub can be used, decided once per process before any download.

Without network, huggingface_hub and datasets retry each request with back-off: two dozen
lines of noise and ~40 s before the error. Instead one short request to the hub's endpoint
(through huggingface_hub's own HTTP client, so proxies and certificates are honoured) tells
whether it answers at all; `HF_HUB_OFFLINE=1` (or `TRANSFORMERS_OFFLINE=1`) says so without
asking. Models and datasets already in the local Hugging Face cache stay usable offline.
"""

from __future__ import annotations

import functools
from typing import Optional

from jaxpeft.errors import first_line

OFFLINE_ENV = "HF_HUB_OFFLINE is set"
# Seconds the probe waits for the hub's answer: a dropped connection costs this, once.
PROBE_TIMEOUT_S = 5.0


@functools.lru_cache(maxsize=None)
def _probe(endpoint: str) -> Optional[str]:
    from huggingface_hub.utils import get_session

    try:
        get_session().head(endpoint, timeout=PROBE_TIMEOUT_S)
    except Exception as e:  # DNS, refused, timeout, proxy, TLS: all mean "cannot reach it"
        return f"cannot reach {endpoint}: {first_line(e)}"
    return None


def offline_reason() -> Optional[str]:
    """None when the hub may be used; otherwise why not: offline mode set in the
    environment, or the probe's error (asked once per process)."""
    import os

    from huggingface_hub import constants

    # The libraries read these variables when imported; a later change counts too.
    said = any(os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"))
    if said or constants.HF_HUB_OFFLINE:
        return OFFLINE_ENV
    return _probe(constants.ENDPOINT)
