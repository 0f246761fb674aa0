"""Test configuration: NequIP's shared fixtures plus paths to the shared reference material."""

from pathlib import Path

import pytest
import torch
from nequip.utils.unittests import CONFTEST_PATH

exec(open(CONFTEST_PATH).read())

#: ``../shared`` beside the project root (published models, golden predictions, benchmarks)
SHARED = Path(__file__).resolve().parents[1].parent / "shared"
REFERENCE = SHARED / "reference"


#: species of the published models' type indices (``../shared/reference/README.md``)
SPECIES = {
    "alloy": (
        "Li Be Na Mg Al Si K Ca Sc Ti V Cr Mn Fe Co Ni Cu Zn Ga Ge Sr Y Zr Nb Mo Ru Rh Pd Ag Cd "
        "In Sn La Ce Pr Nd Sm Gd Tb Dy Ho Er Tm Lu Hf Ta W Re Os Ir Pt Au Pb"
    ).split(),
    "cathod": "Li O Na Cr Mn Fe Co Ni".split(),
    "cu2se_p": ["Cu", "Se"],
}
#: golden predictions of each published model
GOLDEN = {
    "alloy": "alloy_sample_golden.cfg",
    "cathod": "cathod_golden.cfg",
    "cu2se_p": "cu2se_p_golden.cfg",
}


def require_reference(name: str) -> Path:
    """Path of a file in ``../shared/reference``; skip the test with a clear reason if absent."""
    path = REFERENCE / name
    if not path.exists():
        pytest.skip(f"reference fixture {path} is absent (needs ../shared beside the project root)")
    return path


@pytest.fixture
def float64_default_dtype():
    """torch's default dtype is float64 during the test (restored afterwards): modules built by
    hand and compared with hand-computed float64 numbers (``tests/nn``, ``tests/model``)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)
