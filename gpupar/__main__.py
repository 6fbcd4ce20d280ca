import os
import sys

from gpupar.cli import main, rank_tag

code = main()
if rank_tag():
    # A rank's exit code is its result. Interpreter finalization can still destroy torch's C++
    # objects (process groups, stores) with live threads, and std::terminate then turns a
    # finished or cleanly failed rank into SIGABRT, and the launcher names the wrong rank.
    # The work is done and every file was written and flushed: skip the finalization.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
sys.exit(code)
