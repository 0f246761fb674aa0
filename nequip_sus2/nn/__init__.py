"""SUS2 graph modules, one paper concept each (docs/theory.md §2)."""

from .embedding import DecoupledElementEmbedding
from .extrapolation import ExtrapolationGrade
from .moments import MomentContraction
from .radial import ChebyshevRadialBasis
from .readout import LinearReadout
from .scaling import UniversalPairScaling

__all__ = [
    "UniversalPairScaling",
    "ChebyshevRadialBasis",
    "DecoupledElementEmbedding",
    "MomentContraction",
    "LinearReadout",
    "ExtrapolationGrade",
]
