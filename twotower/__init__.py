"""Two-tower retrieval on NVIDIA Merlin: data to a served top-k endpoint."""

from twotower.offline import disable_telemetry, install_egress_guard_from_environment

# First thing on import, before any module of the package imports Feast (twotower/offline.py).
disable_telemetry()
install_egress_guard_from_environment()
