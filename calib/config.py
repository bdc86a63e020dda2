"""Calibration configuration and the resolved precision settings of the exported program."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from intsim.program.format import DEFAULT_SETTINGS, check_settings
from intsim.program.quantizers import TYPES as SOFTMAX_TYPES

LN_RULES = ("mosf", "mean")
# "channel": per-channel post-LN quantizers without reparameterization, the upper bound the rules
# approximate. An integer GEMM cannot mix input-channel scales in one accumulation, so it has no
# program: only calib.vit.channelwise_fakequant evaluates it (fake-quant level only).
FAKEQUANT_ONLY_LN_RULES = ("channel",)
RECON_DEFAULTS: dict[str, Any] = {"recon_images": 256, "recon_iters": 500, "recon_lr": 0.3, "recon_batch": 16}
RECON_FIELDS = tuple(["reconstruct", *RECON_DEFAULTS])


@dataclass
class CalibConfig:
    """What to calibrate and how.

    * ``wbits`` / ``abits``: weight / activation code widths (2..8). ``abits`` also sets the
      post-softmax quantizer width.
    * ``softmax_quant``: post-softmax quantizer family, ``uniform`` | ``log2`` | ``log2sqrt`` | ``tanq`` |
      ``adalog`` | ``sulq`` | ``twin`` (``intsim.program.quantizers``; searched by ``calib.softmax_search``).
    * ``ln_rule``: shared post-LayerNorm scale, ``mosf`` (median of the channel scales, DopQ-ViT) or
      ``mean`` (RepQ-ViT).
    * ``seed``: seeds every subsample (the result is a pure function of inputs and config).
    * ``settings``: overrides of ``intsim.program.format.DEFAULT_SETTINGS`` (integer datapath widths);
      ``wbits`` / ``abits`` there must agree with the fields above.
    * ``sequential``: calibrate each block on the output of the already quantized blocks before
      it (fake-quant path, as RepQ-ViT's one-pass initialization sees it); ``False`` calibrates
      every block on the float model's activations.
    * ``reconstruct``: after calibration, tune every unit (patch embedding, each block, head) so
      that its fake-quant output matches the float model's (:mod:`calib.reconstruct`: activation
      scales, then the post-LN reparameterization, then the weights' rounding). Off by default.
    * ``recon_images``: how many of the reconstruction images to use (the first ones; default 256).
    * ``recon_iters``: optimizer steps per unit, all three stages together (split 1/4 activations,
      1/4 post-LN reparameterization, 1/2 weight rounding).
    * ``recon_lr``: Adam learning rate of the rounding variables; the log-scales use a tenth of it.
    * ``recon_batch``: images per step.
    The reconstruction fields are recorded in the program only when ``reconstruct`` is on.
    """

    wbits: int = 4
    abits: int = 4
    softmax_quant: str = "tanq"
    ln_rule: str = "mosf"
    seed: int = 0
    settings: dict[str, int] = field(default_factory=dict)
    sequential: bool = True
    reconstruct: bool = False
    recon_images: int = RECON_DEFAULTS["recon_images"]
    recon_iters: int = RECON_DEFAULTS["recon_iters"]
    recon_lr: float = RECON_DEFAULTS["recon_lr"]
    recon_batch: int = RECON_DEFAULTS["recon_batch"]

    def validate(self) -> None:
        for name in ("wbits", "abits"):
            v = getattr(self, name)
            if not isinstance(v, int) or not 2 <= v <= 8:
                raise ValueError(f"{name} must be an integer in 2..8, got {v!r}")
        if self.softmax_quant not in SOFTMAX_TYPES:
            raise ValueError(f"softmax_quant must be one of {', '.join(SOFTMAX_TYPES)}, got {self.softmax_quant!r}")
        if self.ln_rule not in LN_RULES + FAKEQUANT_ONLY_LN_RULES:
            raise ValueError(f"ln_rule must be one of {', '.join(LN_RULES)}, got {self.ln_rule!r}")
        if self.ln_rule in FAKEQUANT_ONLY_LN_RULES and self.reconstruct:
            raise ValueError(f"ln_rule {self.ln_rule!r} (fake-quant only) cannot be combined with reconstruction")
        if not isinstance(self.sequential, bool):
            raise ValueError(f"sequential must be True or False, got {self.sequential!r}")
        if not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if not isinstance(self.reconstruct, bool):
            raise ValueError(f"reconstruct must be True or False, got {self.reconstruct!r}")
        for name in ("recon_images", "recon_iters", "recon_batch"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        lr = self.recon_lr
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (0 < float(lr) < 1):
            raise ValueError(f"recon_lr must be a number in (0, 1), got {lr!r}")
        unknown = sorted(set(self.settings) - set(DEFAULT_SETTINGS))
        if unknown:
            raise ValueError(f"unknown settings {', '.join(unknown)} (known: {', '.join(DEFAULT_SETTINGS)})")
        for k, v in self.settings.items():
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"setting {k} must be an integer, got {v!r}")
        for name in ("wbits", "abits"):
            if name in self.settings and self.settings[name] != getattr(self, name):
                raise ValueError(f"settings[{name!r}]={self.settings[name]} disagrees with {name}={getattr(self, name)}")
        # the settings' own bounds (docs/integer-spec.md section 8), before any calibration work
        check_settings({**DEFAULT_SETTINGS, **self.settings, "wbits": self.wbits, "abits": self.abits})

    def resolved_settings(self) -> dict[str, int]:
        """DEFAULT_SETTINGS overridden by ``settings`` and by ``wbits`` / ``abits`` (sorted keys)."""
        self.validate()
        s = {**DEFAULT_SETTINGS, **self.settings, "wbits": self.wbits, "abits": self.abits}
        return {k: int(s[k]) for k in sorted(s)}

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if self.reconstruct:
            d["recon_lr"] = float(self.recon_lr)
        else:       # a calibration-only program records exactly what it did before reconstruction existed
            for k in RECON_FIELDS:
                d.pop(k)
        d["settings"] = {k: int(v) for k, v in sorted(self.settings.items())}
        return d
