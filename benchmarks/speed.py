"""Time per image of each method vs the plain backbone forward over the same crops, and peak
memory: the `zegkit bench` command as a script (the measurement lives in `zegkit.bench`).

    python benchmarks/speed.py [--methods sclip cliper] [--classes 10 150] [--repeats 5]
        [--precisions fp32 auto] [--models random-ViT-B/16 zegkit/tiny-synthetic] [--json out.json]
"""

from __future__ import annotations

import sys

from zegkit.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
