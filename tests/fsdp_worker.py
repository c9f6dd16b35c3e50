"""Run stages through the command line's entry point, one after another, in each process of a distributed launch
(used by test_sharded.py, so that one launch serves several stages).

usage: accelerate launch ... fsdp_worker.py 'STAGE key=value ...' ['STAGE key=value ...' ...]
"""

import shlex
import sys

from instructgpt.cli import main

for spec in sys.argv[1:]:
    stage, *overrides = shlex.split(spec)
    status = main([stage, *overrides])
    if status:
        sys.exit(status)
