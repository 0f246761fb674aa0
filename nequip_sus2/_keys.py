"""Names of the data fields that SUS2 modules add to an ``AtomicDataDict``."""

from nequip.data._key_registry import register_fields

#: per edge, per scaling channel eta: xi = tanh(alpha (r - r0) / 2)  [num_edges, N_eta]
SCALED_DISTANCE_KEY = "sus2_scaled_distance"
#: per edge: sigma T_n(xi) (r - R_c)^2  [num_edges, N_eta, R]
RADIAL_BASIS_KEY = "sus2_radial_basis"
#: per atom: the scalar basis functions B_a(i) the linear readout sees  [num_atoms, N_B]
SCALAR_BASIS_KEY = "sus2_scalar_basis"
#: per atom: the extrapolation grade gamma(i) >= 0 of its environment  [num_atoms, 1]
EXTRAPOLATION_GRADE_KEY = "sus2_extrapolation_grade"

register_fields(
    node_fields=[SCALAR_BASIS_KEY, EXTRAPOLATION_GRADE_KEY],
    edge_fields=[SCALED_DISTANCE_KEY, RADIAL_BASIS_KEY],
)
