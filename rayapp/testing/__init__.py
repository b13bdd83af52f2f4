"""Hooks the test suite uses to inject faults into real runs (off unless their env var is set)."""
