"""Test-and-benchmark support: the PyTorch oracle harness.

Nothing here is imported by ``jaxyolo`` itself; it needs torch and the pinned
upstream packages that ``scripts/test.sh`` installs.
"""
