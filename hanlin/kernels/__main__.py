"""`python -m hanlin.kernels`: build (or find in the cache) the compiled kernels; run by scripts/setup."""

import sys

from hanlin.kernels import cpu_kernels

if __name__ == "__main__":
    kernels = cpu_kernels()
    print("hanlin kernels:", "ready" if kernels else "not built (the PyTorch fallbacks will be used)")
    sys.exit(0)
