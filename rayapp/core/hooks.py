"""The injection point for the test suite's fault hooks (rayapp/testing/faults.py): product code
asks for a hook by name and gets None, unless ``RAYAPP_TEST_HOOKS`` names a module that provides
it. The test suite sets that variable (tests/conftest.py) before it starts any cluster, so Ray's
workers inherit it; product code never imports test code.
"""

from __future__ import annotations

import importlib
import os

HOOKS_ENV = "RAYAPP_TEST_HOOKS"


def hook(name: str, *args):
    """``<module>.<name>(*args)`` of the module ``RAYAPP_TEST_HOOKS`` names (a callable hook, or
    None when that fault is not asked for); None when no module is named."""
    module = os.environ.get(HOOKS_ENV)
    if not module:
        return None
    factory = getattr(importlib.import_module(module), name, None)
    return factory(*args) if factory is not None else None
