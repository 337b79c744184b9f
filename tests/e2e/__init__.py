"""End-to-end tests: the real inference service and gateway on loopback."""
