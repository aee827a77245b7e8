"""`python -m metaspo_hf.bench [--workloads w1,w3,w4] [--quick] ...`: the same as `metaspo bench`."""

import sys

from ..cli import main

sys.exit(main(["bench", *sys.argv[1:]]))
