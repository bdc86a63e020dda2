import os
import sys

# tests/ holds helpers (spec_ref.py) imported by several test modules
sys.path.insert(0, os.path.dirname(__file__))

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """Tests marked ``heavy`` (several minutes each: the 1000-mutation fuzz, the qonnx executor on a
    Swin) run only when selected: ``pytest -m heavy``; the test command skips them, saying how."""
    expr = config.getoption("markexpr") or ""
    if "heavy" in expr and "not heavy" not in expr:
        return
    skip = pytest.mark.skip(reason="several minutes: select with -m heavy")
    for item in items:
        if "heavy" in item.keywords:
            item.add_marker(skip)
