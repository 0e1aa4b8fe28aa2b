"""The process's one TLS context: its CA certificates are loaded once (about 35 ms each time),
however many HTTP clients and transports the process makes.

Trusted certificates as httpx chooses them: ``SSL_CERT_FILE`` or ``SSL_CERT_DIR`` from the
environment where set, else certifi's bundle.
"""

from __future__ import annotations

import functools
import os
import ssl


@functools.cache
def tls_context() -> ssl.SSLContext:
    """The shared client context (made on first use)."""
    if os.environ.get("SSL_CERT_FILE") or os.environ.get("SSL_CERT_DIR"):
        return ssl.create_default_context()
    import certifi  # noqa: PLC0415 - httpx's bundle, loaded where TLS is used

    return ssl.create_default_context(cafile=certifi.where())
