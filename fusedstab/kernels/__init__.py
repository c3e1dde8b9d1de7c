"""Triton kernels and their launchers. Imported lazily by fusedstab.ops: importing fusedstab never
imports triton."""
