"""`python -m pagedserve.kernels`: build the CPU kernels ahead of time (exit 1 if that is impossible)."""
import logging
import sys

from pagedserve.kernels import cpu_kernels_available

logging.basicConfig(level=logging.INFO, format="%(message)s")
sys.exit(0 if cpu_kernels_available() else 1)
