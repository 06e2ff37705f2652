"""`python -m hanlin.kernels`: build (or find in the cache) the compiled kernels; run by scripts/setup."""

import sys

from hanlin.kernels import int8_kernel

if __name__ == "__main__":
    kernel = int8_kernel()
    print("hanlin kernels:", "int8_linear ready" if kernel else "not built (the PyTorch fallback will be used)")
    sys.exit(0)
