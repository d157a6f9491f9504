"""The one table of dtype names used in configs, caches and evals: name <-> torch dtype.

    torch_dtype("bfloat16")          -> torch.bfloat16
    torch_dtype("auto", device)      -> torch.bfloat16 on a CUDA device, else torch.float32
    dtype_name(torch.float16)        -> "float16"

"auto" is the rule for frozen models (encoders, eval judges): bf16 on GPU, as the reference runs
them, fp32 on CPU (where bf16 matmuls are slow or missing). A leaf module: it imports only torch.
"""

from __future__ import annotations

import torch

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_NAMES: tuple[str, ...] = tuple(DTYPES)
"""The names a config may give (``auto`` aside)."""
AUTO = "auto"


def torch_dtype(name: str, device: torch.device | str | None = None) -> torch.dtype:
    """The torch dtype called ``name``; ``auto``: bfloat16 when ``device`` is a CUDA device, else
    float32 (also when no device is given). ValueError naming the allowed names for any other name."""
    if name == AUTO:
        return torch.bfloat16 if device is not None and str(device).startswith("cuda") else torch.float32
    try:
        return DTYPES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown dtype {name!r}: must be one of {', '.join(DTYPE_NAMES)} (or {AUTO})") from None


def dtype_name(dtype: torch.dtype) -> str:
    """The config name of a torch dtype (``torch.bfloat16`` -> "bfloat16"); ValueError for others."""
    for name, d in DTYPES.items():
        if d == dtype:
            return name
    raise ValueError(f"dtype {dtype} has no config name; use one of {', '.join(DTYPE_NAMES)}")
