"""pytest-benchmark set-up. Runs before torch is imported (libgomp reads this only when loaded)."""
import os

# Spinning OpenMP workers on a small CPU machine make times jump in 4 ms scheduler quanta.
os.environ.setdefault("OMP_WAIT_POLICY", "passive")
