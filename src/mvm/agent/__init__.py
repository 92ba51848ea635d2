"""The guest agent: wire protocol (shared), host client, and the guest program."""
