"""Images: kernel, initramfs, read-only root filesystem and manifest, stored by content hash."""
