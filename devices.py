"""
Where the numbers are computed: the default device and the autocast context of a dtype, in one place
for train.py, sample.py and eval.py.

    device = devices.default_device()        # 'cuda' when a CUDA GPU is present, else 'cpu'
    ctx = devices.autocast(device, dtype)    # dtype: 'float32', 'bfloat16' or 'float16'
    with ctx:
        logits, loss = model(x, y)

float32 runs as is. bfloat16 and float16 run the forward pass under torch.autocast on the device's
type ('cuda' for 'cuda:1'): matmuls in the low precision, weights and optimizer state stay float32.
Whether a device exists on this machine is a config rule (configurator.DEVICE, with its error
messages); the dtype names are configurator.DTYPES. peak_flops(device, dtype) is MFU's denominator
(train.py's log, bench.py).
"""

import time
from contextlib import nullcontext

import torch

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def default_device():
    """'cuda' when a CUDA GPU is present, else 'cpu': every script's default --device."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def device_type(device):
    """'cuda:1' -> 'cuda'; 'cpu', 'cuda', 'mps' as they are: what torch.autocast and GradScaler take."""
    return device.split(":")[0]


def autocast(device, dtype):
    """The context a forward pass runs in: nothing for float32, else torch.autocast to `dtype`."""
    if dtype == "float32":
        return nullcontext()
    return torch.autocast(device_type=device_type(device), dtype=TORCH_DTYPES[dtype])


# Peak dense (no sparsity) bf16 tensor-core FLOP/s by GPU, from the vendors' data sheets: MFU's denominator.
# Looked up by the first key contained in torch.cuda.get_device_name() (so the variants come first).
GPU_PEAK_BF16_FLOPS = {"H100 PCIe": 756.5e12, "H100 NVL": 835.5e12, "H200 NVL": 835.5e12, "H100": 989.4e12,
                       "H200": 989.4e12, "A100": 312e12, "L40S": 362e12, "4090": 165e12, "A10": 125e12,
                       "V100": 125e12, "T4": 65e12}


def gpu_peak_flops(name):
    """Peak dense bf16 FLOP/s of the GPU called `name` (torch.cuda.get_device_name()); None if unknown."""
    return next((v for k, v in GPU_PEAK_BF16_FLOPS.items() if k in name), None)


def peak_flops(device, dtype):
    """Peak dense matmul FLOP/s of `device` in `dtype`, for MFU; None for a GPU not in the table."""
    if device_type(device) == "cuda":
        peak = gpu_peak_flops(torch.cuda.get_device_name(device))  # bf16
        if peak is not None and dtype == "float32":
            peak /= 2  # TF32 runs at half the bf16 rate on these parts
        return peak
    if device_type(device) == "cpu":  # no table can know a CPU: measure a large matmul once
        a = torch.randn(1024, 1024, dtype=TORCH_DTYPES[dtype])
        for _ in range(2):
            a @ a
        t0 = time.perf_counter()
        for _ in range(8):
            a @ a
        return 8 * 2 * 1024**3 / (time.perf_counter() - t0)
    return None
