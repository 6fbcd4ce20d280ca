import os
import sys


def die_with_launcher() -> None:
    """A rank must not outlive the gpupar launcher that started it (kill -9 of the launcher
    would leave it training, holding the devices, forever). Linux: the kernel sends SIGKILL
    when the parent dies (prctl PR_SET_PDEATHSIG); elsewhere a thread watches the parent.
    The parent may already have died before this ran: then its pid is no longer ours."""
    launcher = int(os.environ.get("GPUPAR_LAUNCHER_PID", "0"))
    if not launcher:
        return  # started by an external torchrun: it owns its workers
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(1, signal.SIGKILL, 0, 0, 0) != 0:  # 1 = PR_SET_PDEATHSIG
            raise OSError(ctypes.get_errno(), "prctl")
    except (OSError, AttributeError):
        import threading
        import time

        def watch() -> None:
            while os.getppid() == launcher:
                time.sleep(0.5)
            os._exit(1)

        threading.Thread(target=watch, daemon=True, name="gpupar-launcher-watch").start()
    if os.getppid() != launcher:
        os._exit(1)


if "RANK" in os.environ and "LOCAL_RANK" in os.environ:
    die_with_launcher()

from gpupar.cli import main, rank_tag  # noqa: E402 (after the rank is tied to its launcher)

command = sys.argv[1:2]  # `gpupar run` hands sys.argv to the user's script
code = main()
if rank_tag():
    # A rank's exit code is its result. Interpreter finalization can still destroy torch's C++
    # objects (process groups, stores) with live threads, and std::terminate then turns a
    # finished or cleanly failed rank into SIGABRT, and the launcher names the wrong rank.
    # The work is done and every file was written and flushed: skip the finalization. A user's
    # script (`gpupar run`) that succeeded still gets its atexit handlers, as `python script.py`
    # runs them: after the script, once the rank has left the process group. A failed one gets
    # none: its group is still joined, and gpupar's own handler would wait at a barrier for
    # peers stuck in a collective (the launcher saw the failure after the timeout, not at once).
    if command == ["run"] and code == 0:
        import atexit

        atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
sys.exit(code)
