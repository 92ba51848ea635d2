"""mvm as an MCP server (``mvmctl mcp``): tools over the Python SDK."""
