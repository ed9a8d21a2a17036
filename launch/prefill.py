"""torchrun entry script: torchrun --nproc-per-node N launch/prefill.py --config CFG --input IN --output OUT"""

import sys

from apb.cli.torchrun_main import main

if __name__ == "__main__":
    sys.exit(main())
