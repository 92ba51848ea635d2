"""The mvmd API: models shared by the daemon and its clients."""
