import sys
from pathlib import Path

import pytest

# The examples are importable by the tests (the NumPy client is one of the federation's clients).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from cohort.local import Federation  # noqa: E402


@pytest.fixture
def federation(tmp_path):
    """A server state directory with a fresh CA in ``tmp_path``; its processes end with the test."""
    fed = Federation(tmp_path)
    yield fed
    fed.close()
