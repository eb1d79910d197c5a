"""Projected GPU time from the counts, per launch: a launch with P programs (thread blocks) runs on
at most min(P, SMs) streaming multiprocessors, so it gets that share of the HBM bandwidth and of the
tensor-core peak: a one-program kernel streams at one SM's share (~25 GB/s of the H100's 3.35 TB/s).

    time = sum over Triton kernels k of max(bytes_k / (BW s_k), flops_k / (F s_k)),  s_k = min(P_k, SMs) / SMs
         + sum over eager ops of max(bytes / BW, flops / F)          (library kernels fill the GPU)
         + launches x launch cost

P_k is the kernel's programs per launch (its grid size). A projection, labelled as such everywhere it
is shown."""

GPUS = {
    "H100": {"bandwidth_Bps": 3.35e12, "bf16_flops": 989e12, "sms": 132},
    "A100": {"bandwidth_Bps": 2.0e12, "bf16_flops": 312e12, "sms": 108},
}
LAUNCH_COST_S = 4e-6   # one kernel launch of an eager PyTorch op, host overhead included


def parallel_share(gpu: str, programs: float | None) -> float:
    """The fraction of the GPU a launch of `programs` programs can use (None: unknown, the whole GPU)."""
    sms = GPUS[gpu]["sms"]
    return 1.0 if programs is None else min(max(programs, 1.0), sms) / sms


def kernel_seconds(gpu: str, bytes_moved: float, flops: float, programs: float | None = None) -> float:
    spec = GPUS[gpu]
    share = parallel_share(gpu, programs)
    return max(bytes_moved / (spec["bandwidth_Bps"] * share), flops / (spec["bf16_flops"] * share))


def projected_ms(gpu: str, bytes_moved: int, flops: int, launches: int, programs: float | None = None) -> float:
    """One block of work (`programs` per launch, None = fills the GPU) plus `launches` launch costs."""
    return (kernel_seconds(gpu, bytes_moved, flops, programs) + launches * LAUNCH_COST_S) * 1e3


def projected_ms_per_launch(gpu: str, kernels, eager_seconds: float, launches: int) -> float:
    """kernels: iterable of (bytes, flops, programs per launch); eager_seconds: the eager ops' roofline sum."""
    seconds = sum(kernel_seconds(gpu, b, f, p) for b, f, p in kernels) + eager_seconds
    return (seconds + launches * LAUNCH_COST_S) * 1e3
