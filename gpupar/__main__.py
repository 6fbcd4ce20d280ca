import sys

from gpupar.cli import main

sys.exit(main())
