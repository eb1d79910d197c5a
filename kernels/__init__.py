"""Triton kernels and their launchers (installed as `fastppo.kernels`). No autograd here.

`kernels/aot.py` lists every @triton.jit kernel with the signature it is compiled with for
sm_80 / sm_90; a new kernel joins the compile test by being listed there.
"""

from ._config import INTERPRET

if INTERPRET:
    from . import _interpreter

    _interpreter.apply()
