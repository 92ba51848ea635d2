"""The VMM seam: QEMU argv (pure), accelerator choice, process and QMP control."""
