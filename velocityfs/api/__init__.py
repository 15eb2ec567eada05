"""The HTTP adapter: Starlette handlers (``app``), Hypercorn (``server``), OpenAPI.

Only constants live here, so the configuration can name the API's defaults
without importing Starlette.
"""

# The largest JSON request body (/u/auth, /p, /p/media) the API reads: the
# configuration's ``api_max_body_bytes``. Larger ones get 413 before they are read.
DEFAULT_MAX_BODY_BYTES = 1 << 20
