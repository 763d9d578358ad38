#!/usr/bin/env python3
"""Collect real calibration data for quantkit: the inputs a model (or one submodule) sees on real data.

Same as `quantkit collect` (quantkit/collect.py does the work, quantkit/cli.py parses). Examples:

    python scripts/collect_calibration.py --out calib/minilm                      # built-in model, text-en
    python scripts/collect_calibration.py --model my_pkg.pipe:load --module denoiser \\
        --runner my_pkg.pipe:run_one --data frames/ --out calib/denoiser --max-samples 256
    python scripts/collect_calibration.py --out calib/minilm --resume             # after an interruption

Exit codes: 0 ok, 2 bad input, 1 a failed run.
"""

import sys
from pathlib import Path

if __name__ == "__main__":
    try:
        from quantkit.cli import main
    except ImportError:  # run from a checkout without installing
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        from quantkit.cli import main
    sys.exit(main(["collect", *sys.argv[1:]]))
