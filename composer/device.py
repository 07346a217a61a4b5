"""Where the library runs and in which precision: `resolve_device`, `resolve_precision`, `autocast`.

The fronts pass the user's words through these (`--device auto|cpu|cuda|cuda:N`,
`--precision auto|fp32|bf16|fp16`), so a wrong word or a GPU that is not there ends in one clear
`UserError` rather than a CUDA stack trace halfway through a run.

Precision is autocast's: parameters stay float32, matmuls and convolutions run in bf16 / fp16 on
the batches' device. Least squares (composer.fit) keeps float64 normal equations whatever the
features' precision: features are cast to float32 before the products.
"""
from __future__ import annotations

import contextlib

import torch

from composer.errors import UserError

PRECISIONS = ("fp32", "bf16", "fp16")
_ALIASES = {"fp32": "fp32", "float32": "fp32", "32": "fp32", "float": "fp32",
            "bf16": "bf16", "bfloat16": "bf16",
            "fp16": "fp16", "float16": "fp16", "half": "fp16", "16": "fp16"}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class DeviceError(UserError):
    """A device or precision that this machine cannot give; the message says what it can."""


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """"auto" (or None): the first CUDA GPU if there is one, else the CPU; "cpu"; "cuda"; "cuda:N"."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    text = (spec or "auto").strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if text == "cpu":
        return torch.device("cpu")
    if text == "cuda" or text.startswith("cuda:"):
        index = text.partition(":")[2]
        if index and not index.isdigit():
            raise DeviceError(f"device '{spec}': expected cuda:N with N a GPU number (0, 1, ...)")
        if not torch.cuda.is_available():
            why = ("this torch is built without CUDA" if torch.version.cuda is None
                   else "no CUDA GPU is visible (driver, CUDA_VISIBLE_DEVICES)")
            raise DeviceError(f"device '{spec}': CUDA is not available here ({why}); use --device cpu or auto")
        count = torch.cuda.device_count()
        if index and int(index) >= count:
            raise DeviceError(f"device '{spec}': this machine has {count} CUDA GPU(s), cuda:0..cuda:{count - 1}")
        return torch.device(text)
    raise DeviceError(f"device '{spec}' is not one of auto, cpu, cuda, cuda:N")


def resolve_precision(spec: str | None, device: torch.device | str) -> str:
    """"fp32" / "bf16" / "fp16" for `device`. "auto" (or None): bf16 on a GPU that supports it, else fp32
    (on CPU bf16 autocast is slower than fp32 on most processors and fp16 slower still)."""
    device = torch.device(device)
    text = (spec or "auto").strip().lower()
    if text == "auto":
        if device.type == "cuda" and torch.cuda.is_available() and _bf16_ok(device):
            return "bf16"
        return "fp32"
    if text not in _ALIASES:
        raise DeviceError(f"precision '{spec}' is not one of auto, {', '.join(PRECISIONS)}")
    p = _ALIASES[text]
    if p == "bf16" and device.type == "cuda" and not _bf16_ok(device):
        raise DeviceError(f"precision bf16: {torch.cuda.get_device_name(device)} does not support bfloat16; "
                          "use --precision fp16 or fp32")
    return p


def _bf16_ok(device: torch.device) -> bool:
    with torch.cuda.device(device):
        return torch.cuda.is_bf16_supported()


def autocast(precision: str, device: torch.device | str):
    """The context that runs forward passes in `precision` on `device` (nothing for fp32)."""
    precision = _ALIASES.get(str(precision).lower())
    if precision is None:
        raise DeviceError(f"precision must be one of {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=DTYPES[precision])


@contextlib.contextmanager
def ieee_fp32(device: torch.device | str):
    """float32 matmuls in full float32 (no TF32) on CUDA while active: least squares needs the
    23-bit mantissa TF32 would cut to 10. A no-op on CPU."""
    if torch.device(device).type != "cuda":
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
