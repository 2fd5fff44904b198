"""Layer 1, data: task suites (local ``.npz`` files and Hugging Face datasets), probe and calibration image sets,
and the generated demo suite.

May import: :mod:`qvec.core`.
"""
