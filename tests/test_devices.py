"""devices.py: the default device, the autocast context of a dtype, and MFU's denominator."""
import torch

import devices


def test_gpu_peak_looks_up_variants_before_the_family():
    assert devices.gpu_peak_flops("NVIDIA H100 80GB HBM3") == devices.gpu_peak_flops("NVIDIA H200") == 989.4e12
    assert devices.gpu_peak_flops("NVIDIA H100 PCIe") < 989.4e12
    assert devices.gpu_peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert devices.gpu_peak_flops("Some Future GPU") is None


def test_cpu_peak_is_measured_and_autocast_only_below_float32():
    assert devices.peak_flops("cpu", "float32") > 1e8  # a 1024 x 1024 matmul, timed
    assert devices.device_type("cuda:1") == "cuda" and devices.default_device() in ("cpu", "cuda")
    with devices.autocast("cpu", "float32"):
        assert not torch.is_autocast_enabled("cpu")
    with devices.autocast("cpu", "bfloat16"):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
