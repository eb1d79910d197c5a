"""Triton kernels and their launchers (installed as `fastppo.kernels`). No autograd here.

`AOT_KERNELS` (in `fastppo.kernels.aot`) lists every @triton.jit kernel with the signature it is
compiled with for sm_80 / sm_90; a new kernel joins the compile test by being listed there.
"""
