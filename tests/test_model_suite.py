"""NequIP's own model test suite (``BaseEnergyModelTests``) run on SUS2 configurations.

Covers initialisation, equivariance, batching, strict locality, numerical gradients, force
smoothness at the cutoff, isolated-atom energies, ``nequip-train`` + ``nequip-package`` sessions
and (for the ``compile`` class) ``nequip-compile --mode aotinductor`` with the ASE calculator.
"""

import pytest
from nequip.utils.unittests.model_tests import BaseEnergyModelTests

BASE = {
    "_target_": "nequip_sus2.model.SUS2Model",
    "seed": 123,
    "type_names": ["H", "C", "O"],
    "r_max": 4.0,
    "radial_basis_size": 5,
}

CONFIGS = {
    "L2K2": {**BASE, "max_rank": 2, "radial_channels": 2},
    "L3K2-LK": {**BASE, "max_rank": 3, "radial_channels": 2, "scaling_map": "LK"},
    "L1K3-L-published": {
        **BASE,
        "max_rank": 1,
        "radial_channels": 3,
        "scaling_map": "L",
        "basis": "published",
    },
    "L2K3-ZBL": {
        **BASE,
        "max_rank": 2,
        "radial_channels": 3,
        "pair_potential": {
            "_target_": "nequip.nn.pair_potential.ZBL",
            "units": "metal",
            "chemical_species": ["H", "C", "O"],
        },
    },
}


class _SUS2Tests(BaseEnergyModelTests):
    @pytest.fixture
    def strict_locality(self):
        return True

    @pytest.fixture(scope="class", params=["minimal_toy_emt.yaml"])
    @classmethod
    def conffile(cls, request):
        return request.param


class TestSUS2(_SUS2Tests):
    # the AOTI compile + ASE test (minutes per parameter) runs for one configuration only, below
    test_ase_compile = None

    @pytest.fixture(scope="class", params=list(CONFIGS.values()), ids=list(CONFIGS))
    @classmethod
    def config(cls, request):
        return dict(request.param)


@pytest.mark.slow
class TestSUS2Compile(_SUS2Tests):
    """One configuration through the slow training/packaging/AOTI-compile tests."""

    @pytest.fixture(scope="class")
    @classmethod
    def config(cls):
        return dict(CONFIGS["L3K2-LK"])

    @pytest.fixture(scope="class")
    @classmethod
    def ase_compile_modifiers(cls):
        """float64 models are compiled with the fused CPU kernels, float32 ones without, so the
        suite's compiled-vs-eager ASE check covers both evaluation paths."""
        return lambda mode, device, model_dtype: (
            ["enable_fused_moments"] if device == "cpu" and model_dtype == "float64" else []
        )
