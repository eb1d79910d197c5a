"""Projected GPU time from the counts: max(bytes / HBM bandwidth, flops / tensor-core peak)
plus launches x launch cost. A projection, labelled as such everywhere it is shown."""

GPUS = {
    "H100": {"bandwidth_Bps": 3.35e12, "bf16_flops": 989e12},
    "A100": {"bandwidth_Bps": 2.0e12, "bf16_flops": 312e12},
}
LAUNCH_COST_S = 4e-6   # one kernel launch of an eager PyTorch op, host overhead included


def projected_ms(gpu: str, bytes_moved: int, flops: int, launches: int) -> float:
    spec = GPUS[gpu]
    seconds = max(bytes_moved / spec["bandwidth_Bps"], flops / spec["bf16_flops"]) + launches * LAUNCH_COST_S
    return seconds * 1e3
