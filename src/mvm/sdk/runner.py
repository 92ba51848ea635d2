"""``python -m mvm.sdk.runner SCRIPT [ARGS...]``: run an SDK script the way ``mvmctl`` does.

The mode comes from the environment (``MVM_SDK_MODE``, see ``mode.py``). An ``MvmError``
the script does not catch is printed as ``mvm: message`` + ``hint:`` (no traceback) and
exits with the error's code; in record mode the recording is saved whatever happens.
"""

from __future__ import annotations

import os
import runpy
import sys
import traceback

from mvm.errors import MvmError
from mvm.sdk import mode


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print("usage: python -m mvm.sdk.runner SCRIPT [ARGS...]", file=sys.stderr)
        return 2
    script = argv[1]
    sys.argv = argv[1:]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    code = 0
    try:
        if mode.current_mode() == "record":
            mode.backend()  # an empty recording is still a recording
        runpy.run_path(script, run_name="__main__")
    except MvmError as exc:
        print(f"mvm: {exc.message}", file=sys.stderr)
        if exc.hint:
            print(f"hint: {exc.hint}", file=sys.stderr)
        code = exc.exit_code
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        rec = mode.recorder()
        if rec is not None:
            rec.save()
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv))
