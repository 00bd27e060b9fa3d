"""python -m engine.kernels: build the kernels now (scripts/install.sh does), and say how it went."""

import logging

from engine.kernels import paged_attention

logging.basicConfig(level=logging.INFO, format="[kernels] %(message)s")
raise SystemExit(0 if paged_attention() is not None else 1)
