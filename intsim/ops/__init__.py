"""The operator registry: one module per op type of the integer program.

    from intsim import ops
    ops.get("attention")        # the module intsim.ops.attention
    ops.OP_SCHEMA["linear"]     # its schema: inputs, attrs, tensors, float tensors, spec section

Adding an op type means adding one module here (and listing it in ``MODULES``) and its golden
function in ``reference.golden``; docs/architecture.md has the checklist.
"""
from __future__ import annotations

from intsim.program.program import ProgramError

from . import add, attention, gelu, layernorm, linear, patch_embed, patch_merge, patchify, token_pool, window_attention
from .base import schema_of

MODULES = {m.NAME: m for m in (linear, patch_embed, layernorm, attention, gelu, add,
                               patchify, patch_merge, window_attention, token_pool)}

OP_SCHEMA: dict[str, dict] = {name: schema_of(m) for name, m in MODULES.items()}


def get(op_type: str):
    """The module of ``op_type``; ``ProgramError`` naming the known types if there is none."""
    try:
        return MODULES[op_type]
    except (KeyError, TypeError):
        raise ProgramError(f"unknown op type {op_type!r} (known: {', '.join(MODULES)})") from None


__all__ = ["MODULES", "OP_SCHEMA", "get"]
