"""The SDK example of the reference cookbook, exactly as printed there, with the image name
left as IMAGE (the printed "python-3.12" exists in no Debian suite mvm builds from)."""

COOKBOOK = """import mvm
with mvm.Sandbox.create(
"IMAGE",
workload_id="agent-tool",
ttl="30m",
include=["src"],
resources=mvm.resources(cpu_cores=1, memory_mb=512, rootfs_size_mb=1024),
network=mvm.network(mode="deny"),
) as sandbox:
    sandbox.files.write("/app/main.py", "print('hello from mvm')")
    sandbox.commands.start(
        ["python", "/app/main.py"],
        env={"MODE": "dev", "API_KEY": mvm.secret("api-key")},
    )
"""
