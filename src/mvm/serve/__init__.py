"""`mvmctl serve`: the mvm API over TCP behind tokens (native relay + E2B face)."""
