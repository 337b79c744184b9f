"""Tests of the inference service (a package, so its conftest and module names never clash with other test folders)."""
