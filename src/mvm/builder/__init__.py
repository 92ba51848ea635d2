"""Builds inside a builder VM: Dockerfiles, [build] steps, OCI imports (see docs/images.md)."""
