#!/usr/bin/env python
"""Run the dialogue-mining pipeline.

    python run_pipeline.py                      # configs/local.yaml on the bundled example
    python run_pipeline.py --config configs/opendialog.yaml --input /data/raw --output /data/out
    python run_pipeline.py --ray-address auto   # on an existing Ray cluster
"""

import sys

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main())
