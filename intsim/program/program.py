"""The integer program in memory, and the format's constants.

``Program`` is the JSON header (model, settings, provenance, values, ops) plus the named tensors;
``intsim.program.format`` reads, writes and validates it; ``intsim.ops`` says what each op holds.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

FORMAT = "intsim-program"
VERSION = 1
META_KEY = "intsim_program"

DEFAULT_SETTINGS: dict[str, int] = {
    "wbits": 4,
    "abits": 4,
    "residual_bits": 16,
    "acc_bits": 32,
    "mult_bits": 32,
    "exp_frac_bits": 8,
    "exp_bits": 16,
    "prob_bits": 16,
    "recip_frac": 30,
    "decode_bits": 16,
    "gelu_bits": 12,
    "ln_recip_bits": 48,
    "ln_norm_frac": 16,
    "logit_bits": 16,
}

#: The largest shift of any rounding shift in a program (docs/integer-spec.md section 1): every
#: shift n satisfies ``|n| <= MAX_SHIFT``, which keeps ``2^n`` and every shifted int64 product
#: representable. Export, golden model and engine all read this one constant.
MAX_SHIFT = 62

VALUE_KINDS = ("image", "codes", "int")


class ProgramError(ValueError):
    """A program file or object that does not follow the format."""


@dataclass
class Program:
    """An integer program in memory: the JSON header and the named tensors (numpy arrays)."""

    header: dict[str, Any]
    tensors: dict[str, np.ndarray] = field(default_factory=dict)

    # ---- convenient views -------------------------------------------------------------
    @property
    def ops(self) -> list[dict[str, Any]]:
        return self.header["ops"]

    @property
    def values(self) -> dict[str, dict[str, Any]]:
        return self.header["values"]

    @property
    def settings(self) -> dict[str, int]:
        return self.header["settings"]

    @property
    def model(self) -> dict[str, Any]:
        return self.header["model"]

    @property
    def output(self) -> str:
        return self.header["output"]

    def t(self, op: dict[str, Any] | str, name: str) -> np.ndarray:
        """The tensor ``name`` of an op (given as the op dict or its name)."""
        opname = op if isinstance(op, str) else op["name"]
        return self.tensors[f"{opname}.{name}"]

    def op(self, name: str) -> dict[str, Any]:
        for o in self.ops:
            if o["name"] == name:
                return o
        raise KeyError(name)


def json_default(o: Any) -> Any:
    """``json.dump``'s ``default`` for numpy scalars and arrays (headers, reports, manifests)."""
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serializable: {type(o)}")


def file_mode(base: int = 0o666) -> int:
    """``base`` less the process umask: the mode an ordinary ``open(path, "w")`` would give
    (``tempfile.mkstemp`` creates 0600 files, so atomic writes set this before the rename)."""
    um = os.umask(0)
    os.umask(um)
    return base & ~um


def write_atomic(path: str | os.PathLike, data: bytes | Callable[[str], None]) -> None:
    """Write ``path`` atomically: a temporary file in the same folder (``data`` itself, or what the
    callable ``data(tmp_path)`` writes there), the umask's mode, then a rename; nothing is left
    behind on failure or interrupt (SIGINT); only SIGKILL can leave a hidden ``.NAME.*.tmp``."""
    p = Path(path)
    fd, tmp = tempfile.mkstemp(dir=p.parent if str(p.parent) else ".", prefix=f".{p.name}.", suffix=".tmp")
    try:
        if callable(data):
            os.close(fd)
            data(tmp)
        else:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        os.chmod(tmp, file_mode())
        os.replace(tmp, p)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
