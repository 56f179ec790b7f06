"""`python -m easyep_sglang.prune`: write a pruned copy of a checkpoint (the code is in easyep_sglang.checkpoint.prune)."""

import signal
import sys

from easyep_sglang.checkpoint.prune import main

if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM cleans up like Ctrl-C
    sys.exit(main())
