"""``python -m mvm.daemon``: run mvmd in the foreground (the CLI starts it detached).

One daemon per MVM_HOME: the winner holds ``mvmd.lock`` for its lifetime; a second
one finds the lock taken and exits 0 saying so. SIGTERM/SIGINT stop the daemon,
not the sandboxes: their QEMUs keep running and the next mvmd reattaches.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import signal
import sys

from aiohttp import web

from mvm import paths
from mvm.daemon.server import Api
from mvm.daemon.tenant_hook import tenant_middleware
from mvm.images.store import ImageStore
from mvm.redact import RedactingFilter
from mvm.service import SandboxService
from mvm.state import StateDB


async def serve() -> None:
    home = paths.home()
    sock = home / "mvmd.sock"
    db = StateDB(home / "state.db")
    service = SandboxService(db, ImageStore(home), pool=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    api = Api(service, str(sock), stop.set)
    app = api.app()
    app.middlewares.append(tenant_middleware)  # tenants relayed by `mvmctl serve`
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    sock.unlink(missing_ok=True)
    old_umask = os.umask(0o177)  # the socket is created 0600: only its owner may talk to mvmd
    try:
        site = web.UnixSite(runner, str(sock))
        await site.start()
    finally:
        os.umask(old_umask)
    try:
        await service.start()  # reattach; until done, requests other than status wait
        logging.info(
            "mvmd %d serving on %s (%d sandboxes)", os.getpid(), sock, len(service.core.live)
        )
        await stop.wait()
    finally:
        sock.unlink(missing_ok=True)
        await runner.cleanup()
        await service.close()
        db.close()
        logging.info("mvmd %d stopped (sandboxes keep running)", os.getpid())


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s mvmd %(levelname)s %(message)s")
    for handler in logging.getLogger().handlers:  # no secret value reaches mvmd's log
        handler.addFilter(RedactingFilter())
    home = paths.home()
    home.mkdir(parents=True, exist_ok=True)
    lock = (home / "mvmd.lock").open("a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        other = lock.read().strip() or "?"
        print(f"mvmd: already running (pid {other}) for {home}", file=sys.stderr)
        return 0
    lock.seek(0)
    lock.truncate()
    lock.write(str(os.getpid()))
    lock.flush()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
