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
messages); the dtype names are configurator.DTYPES.
"""

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
