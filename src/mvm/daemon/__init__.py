"""mvmd: the host daemon that owns named sandboxes."""
