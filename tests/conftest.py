"""Test configuration: NequIP's shared fixtures plus paths to the shared reference material."""

from pathlib import Path

import pytest
from nequip.utils.unittests import CONFTEST_PATH

exec(open(CONFTEST_PATH).read())

#: ``../shared`` beside the project root (published models, golden predictions, benchmarks)
SHARED = Path(__file__).resolve().parents[1].parent / "shared"
REFERENCE = SHARED / "reference"


def require_reference(name: str) -> Path:
    """Path of a file in ``../shared/reference``; skip the test with a clear reason if absent."""
    path = REFERENCE / name
    if not path.exists():
        pytest.skip(f"reference fixture {path} is absent (needs ../shared beside the project root)")
    return path
