"""Fixtures for qmlkit-postgres's own tests: the shared ones from the repository's suite."""

from tests.conftest import postgres_url, run_id  # noqa: F401  (fixtures, re-exported)
