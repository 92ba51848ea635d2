"""An E2B-compatible face over mvm: control plane, envd Connect RPC, files."""
