"""Shared test support: one builder for test configs (tests/support/configs.py) and events."""
