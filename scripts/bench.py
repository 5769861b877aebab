#!/usr/bin/env python
"""Same as ``hetsched bench``: hetsched vs onnxruntime baselines vs the limit, see hetsched/bench/run.py
(options: hetsched/cli/bench.py).

    python scripts/bench.py                      # the three built-in scenarios, a few minutes
    python scripts/bench.py --quick --out /tmp/b # harness check, seconds
"""

import sys

from hetsched.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
