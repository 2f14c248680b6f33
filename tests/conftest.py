"""Test-wide settings. The CPU ops' autotuner (csrc/ops/autotune.h) times candidate schedules on the first calls
of a process and keeps the fastest; candidates differ in floating-point rounding, so outputs of the same call
could differ by rounding between the first calls and later ones. Tests that compare two runs bit for bit
need the deterministic defaults: autotuning is off here unless a test turns it on (tests/test_autotune.py
does, and forces every candidate against the reference).

oneDNN may run only a process's first MCSMOE_ONEDNN_SHAPES product shapes (default 32: its cache's memory); this
process runs thousands of tests, so the cap is lifted here so that every test can still force and time oneDNN
(tests/test_onednn_shapes.py checks the cap in processes of their own)."""
import os

os.environ.setdefault("MCSMOE_AUTOTUNE", "0")
os.environ.setdefault("MCSMOE_ONEDNN_SHAPES", "100000")
