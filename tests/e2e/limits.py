"""The limits the end-to-end gateway runs with (shared by its fixture and the tests that probe them)."""

GATEWAY_MAX_IMAGE_BYTES = 8 * 1024 * 1024
# every corpus bomb is beyond this, every real file within it
GATEWAY_MAX_PIXELS = 40_000_000
