"""The architecture registry: which model families calibration knows, and what each one brings.

    from calib import archs
    arch = archs.for_model(model)        # the entry of a timm model (ValueError if none)
    arch = archs.for_program(program)    # the entry of a program (its header's model.arch)
    arch.calibrate(model, images, mean, std, config)   # its calibration driver -> Program
    arch.fakequant_model(program)        # its fake-quant model of a program
    arch.supports("reconstruction")      # an optional capability

An entry names its implementation modules by dotted path (``module:attribute``) and they are
imported when first used, so that this registry can be imported from every layer (the study
commands, the reference side) without loading torch or timm, and without an import cycle.
Nothing outside this module asks "is this a Swin?": ask the entry.

Adding an architecture: a driver module in ``calib/`` with ``calibrate(model, images, mean, std,
config, provenance, progress, recon_images) -> Program`` and ``build_program(state, settings,
provenance)`` (writing ``model.arch`` = the entry's name), a fake-quant class in ``reference/``,
its op types in ``intsim/ops/`` if it needs new ones, and one :class:`Architecture` in ``ARCHS``.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from .config import FAKEQUANT_ONLY_LN_RULES, CalibConfig

#: Optional capabilities an entry may list in ``features``: block reconstruction
#: (``calib.reconstruct``), the ``intsim sensitivity`` / ``intsim clipping`` studies and
#: ``intsim profile``.
FEATURES = ("reconstruction", "sensitivity", "clipping", "profile")


def _resolve(path: str) -> Any:
    module, _, attr = path.partition(":")
    obj = importlib.import_module(module)
    return getattr(obj, attr) if attr else obj


@dataclass(frozen=True)
class Architecture:
    """One model family.

    ``name``: the program header's ``model.arch``; ``title``: how messages name it;
    ``model_class``: the timm class it calibrates (``module:Class``; subclasses match);
    ``driver``: the calibration driver module (walks the model, emits the graph of spec section
    ``graph_spec``); ``fakequant``: the fake-quant model class of its programs (``module:Class``,
    constructed from a program); ``features``: the optional capabilities it supports (``FEATURES``).
    """

    name: str
    title: str
    model_class: str
    driver: str
    graph_spec: str
    fakequant: str
    features: frozenset[str] = frozenset()

    def __post_init__(self):
        unknown = set(self.features) - set(FEATURES)
        if unknown:
            raise ValueError(f"architecture {self.name!r}: unknown features {sorted(unknown)}")

    # ---- what it is ------------------------------------------------------------------------
    def matches(self, model) -> bool:
        """Whether ``model`` is an instance of this entry's model class."""
        return isinstance(model, _resolve(self.model_class))

    def supports(self, feature: str) -> bool:
        """Whether the optional capability ``feature`` (one of ``FEATURES``) exists for this entry."""
        if feature not in FEATURES:
            raise ValueError(f"unknown feature {feature!r} (known: {', '.join(FEATURES)})")
        return feature in self.features

    # ---- what it does ----------------------------------------------------------------------
    @property
    def driver_module(self):
        """The calibration driver module (``calibrate``, ``calibrate_params``, ``build_program``)."""
        return _resolve(self.driver)

    def calibrate(self, model, images, mean, std, config: CalibConfig | None = None,
                  provenance: dict | None = None, progress: bool = True, recon_images=None):
        """Calibrate ``model`` with this entry's driver (see :func:`calibrate`)."""
        return self.driver_module.calibrate(model, images, mean, std, config, provenance, progress, recon_images)

    def build_program(self, state, settings: dict[str, int], provenance: dict[str, Any]):
        """The integer program of this entry's calibration state (its graph)."""
        return self.driver_module.build_program(state, settings, provenance)

    @property
    def fakequant_class(self) -> type:
        """The fake-quant model class of this entry's programs."""
        return _resolve(self.fakequant)

    def fakequant_model(self, program, *args, **kwargs):
        """The fake-quant model of ``program`` (extra arguments go to the class)."""
        return self.fakequant_class(program, *args, **kwargs)


VIT = Architecture(
    name="vit", title="ViT / DeiT",
    model_class="timm.models.vision_transformer:VisionTransformer",
    driver="calib.vit", graph_spec="6",
    fakequant="reference.fakequant:FakeQuantModel",
    features=frozenset(FEATURES))

SWIN = Architecture(
    name="swin", title="Swin",
    model_class="timm.models.swin_transformer:SwinTransformer",
    driver="calib.swin", graph_spec="9",
    fakequant="reference.fakequant:FakeQuantModel")

#: The registry, by name.
ARCHS: dict[str, Architecture] = {a.name: a for a in (VIT, SWIN)}


def for_model(model) -> Architecture:
    """The entry whose model class ``model`` is an instance of; ``ValueError`` if none."""
    for a in ARCHS.values():
        if a.matches(model):
            return a
    known = ", ".join(f"{a.model_class.partition(':')[2]} ({a.title})" for a in ARCHS.values())
    raise ValueError(f"unsupported model {type(model).__name__}: calibration knows the timm classes {known}")


def for_program(program) -> Architecture:
    """The entry of a program (its header's ``model.arch``); ``ValueError`` if unknown."""
    name = program.model.get("arch")
    try:
        return ARCHS[name]
    except (KeyError, TypeError):
        raise ValueError(f"program of unknown architecture {name!r} (known: {', '.join(ARCHS)})") from None


def supporting(feature: str) -> str:
    """The titles of the entries that support ``feature``, for messages ("ViT / DeiT")."""
    return ", ".join(a.title for a in ARCHS.values() if a.supports(feature))


def calibrate(model, images, mean, std, config: CalibConfig | None = None, provenance: dict | None = None,
              progress: bool = True, recon_images=None):
    """Post-training quantization (DopQ-ViT) of a timm model into an integer program, by the
    driver of its architecture (:func:`for_model`: ViT / DeiT -> :mod:`calib.vit`, Swin ->
    :mod:`calib.swin`).

    ``images``: uint8 (N, 3, H, W), already resized / cropped, raw pixels; ``mean`` / ``std``: the
    model's input normalization (3 each); ``config``: :class:`calib.config.CalibConfig`;
    ``provenance``: caller's record (model name, checkpoint...), stored in the header with the
    calibration settings added under ``"calibration"``; ``recon_images``: uint8 images for the
    optional reconstruction stage (``config.reconstruct``, :mod:`calib.reconstruct`; the first
    ``config.recon_images`` are used; default: ``images``), where the architecture supports it.
    Deterministic: the same inputs and config give a byte-identical saved program.
    """
    if config is not None and config.ln_rule in FAKEQUANT_ONLY_LN_RULES:
        raise ValueError(f"ln_rule {config.ln_rule!r} has no integer program (an integer GEMM cannot mix "
                         f"input-channel scales); evaluate it with calib.vit.channelwise_fakequant")
    arch = for_model(model)
    if config is not None and config.reconstruct and not arch.supports("reconstruction"):
        raise ValueError(f"block reconstruction (reconstruct=True) is implemented for {supporting('reconstruction')} "
                         f"models only, not for {arch.title}")
    return arch.calibrate(model, images, mean, std, config, provenance, progress, recon_images)
