"""Fixtures of the integration tests, beyond the shared ones in tests/conftest.py."""

from tests.embed_support import app_env  # noqa: F401  (a fixture: the env of an embedding app)
