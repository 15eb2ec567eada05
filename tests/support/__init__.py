"""Helpers shared by the test suite (imported by tests/conftest.py)."""
