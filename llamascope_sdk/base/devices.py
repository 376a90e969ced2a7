"""Devices: turning ``--device``/``device=`` into a torch device that exists on this machine."""

from __future__ import annotations

import torch

from llamascope_sdk.base.errors import DeviceError


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"`` -> a device that exists here.

    Raises:
        DeviceError: an unknown name, the meta device, or a GPU this machine does not have.
    """
    if device is None:
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise DeviceError(f"unknown device {str(device)!r}: allowed are cpu, cuda, cuda:N, mps",
                          hint="use --device cpu") from None
    if dev.type == "meta":
        raise DeviceError("device 'meta' holds no data, so nothing can run on it",
                          hint="use --device cpu or cuda")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {device}: CUDA is not available here (torch "
                              f"{torch.__version__}, {'no GPU visible' if torch.version.cuda else 'built without CUDA'})",
                              hint="use --device cpu, or install a CUDA build of torch (see README)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(f"--device {device}: this machine has {torch.cuda.device_count()} "
                              f"CUDA device(s), numbered from 0", hint="use --device cuda:0")
    elif dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise DeviceError("--device mps: Apple's MPS backend is not available here",
                          hint="use --device cpu")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise DeviceError(f"device type {dev.type!r} is not supported: use cpu, cuda or mps",
                          hint="use --device cpu")
    return dev
