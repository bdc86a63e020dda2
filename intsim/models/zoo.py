"""Model registry: short names, timm architectures, evaluation transforms and weight loading.

| short name | timm architecture | weights |
|---|---|---|
| ``cifar10_vit_d6`` | the bundled CIFAR-10 ViT (32 px, patch 4, dim 192, depth 6) | bundled with intsim |
| ``cifar10_vit_d6_stress`` | its stress variant with outlier channels (``intsim/models/stress.py``) | derived on the fly |
| ``deit_t`` / ``deit_s`` / ``deit_b`` | ``deit_{tiny,small,base}_patch16_224`` | ImageNet, from timm |
| ``vit_s`` / ``vit_b`` | ``vit_{small,base}_patch16_224`` | ImageNet, from timm |
| ``swin_t`` / ``swin_s`` / ``swin_b`` | ``swin_{tiny,small,base}_patch4_window7_224`` | ImageNet, from timm |

Weights come from ``--checkpoint PATH`` (a state dict as safetensors or a torch file), else the
pretrained weights (bundled file, or timm's: local Hugging Face cache, download when the network
allows), or seeded random weights with ``weights="random"``.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from intsim.data import ASSETS as ASSET_DIR
from intsim.errors import UserError

from . import cifar_model

if TYPE_CHECKING:       # torch and timm are imported where a model is built or read, so that the
    import torch        # command line (--help, inspect, export, hw, sweep --status) starts without them



@dataclass(frozen=True)
class ModelSpec:
    name: str            # short name used on the command line
    timm_name: str       # timm architecture (or the bundled model's name)
    bundled: str | None = None   # file in intsim/assets holding the weights, for bundled models
    stress: bool = False         # derived on the fly by intsim.models.stress.apply_stress (synthetic outliers)

    @property
    def is_bundled(self) -> bool:
        return self.bundled is not None


MODELS: dict[str, ModelSpec] = {
    cifar_model.NAME: ModelSpec(cifar_model.NAME, cifar_model.NAME, bundled=f"{cifar_model.NAME}.safetensors"),
    f"{cifar_model.NAME}_stress": ModelSpec(f"{cifar_model.NAME}_stress", cifar_model.NAME,
                                            bundled=f"{cifar_model.NAME}.safetensors", stress=True),
    "deit_t": ModelSpec("deit_t", "deit_tiny_patch16_224"),
    "deit_s": ModelSpec("deit_s", "deit_small_patch16_224"),
    "deit_b": ModelSpec("deit_b", "deit_base_patch16_224"),
    "vit_s": ModelSpec("vit_s", "vit_small_patch16_224"),
    "vit_b": ModelSpec("vit_b", "vit_base_patch16_224"),
    "swin_t": ModelSpec("swin_t", "swin_tiny_patch4_window7_224"),
    "swin_s": ModelSpec("swin_s", "swin_small_patch4_window7_224"),
    "swin_b": ModelSpec("swin_b", "swin_base_patch4_window7_224"),
}
DEFAULT_MODEL = cifar_model.NAME


def resolve(name: str) -> ModelSpec:
    """The spec of a short name (timm architecture names are accepted too)."""
    if name in MODELS:
        return MODELS[name]
    for spec in MODELS.values():
        if spec.timm_name == name and not spec.stress:
            return spec
    raise UserError(f"unknown model '{name}'. Known models: {', '.join(MODELS)}")


def build(spec: ModelSpec) -> torch.nn.Module:
    """The architecture with untrained weights (deterministic given torch's seed)."""
    if spec.is_bundled:
        return cifar_model.build()
    import timm
    return timm.create_model(spec.timm_name, pretrained=False)


def data_config(spec: ModelSpec) -> dict:
    """timm's evaluation data config: input_size, interpolation, crop_pct, mean, std."""
    if spec.is_bundled:
        return dict(cifar_model.DATA_CONFIG)
    import timm
    cfg = timm.get_pretrained_cfg(spec.timm_name)
    return {k: getattr(cfg, k) for k in ("input_size", "interpolation", "crop_pct", "mean", "std")}


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    import torch
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            sd = load_file(str(path))
        else:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"checkpoint {path} could not be read ({type(e).__name__}: {str(e)[:200]})") from None
    for key in ("model", "state_dict", "model_ema"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
            break
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError(f"checkpoint {path} does not hold a state dict of tensors")
    return sd


def load_checkpoint(model: torch.nn.Module, path: str | os.PathLike, spec: ModelSpec) -> None:
    """Load a state dict into ``model``; a mismatched one raises ``UserError`` naming the keys."""
    sd = _read_state_dict(Path(path))
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    bad = sorted(k for k in set(own) & set(sd) if tuple(own[k].shape) != tuple(sd[k].shape))
    if missing or unexpected or bad:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
        if bad:
            parts.append("shape mismatch for " + ", ".join(f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}"
                                                          for k in bad[:3]))
        raise UserError(f"checkpoint {path} does not match model '{spec.name}' ({spec.timm_name}): "
                        + "; ".join(parts))
    model.load_state_dict({k: v.float() for k, v in sd.items()})


def _network_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _no_weights_message(spec: ModelSpec) -> str:
    return (f"No weights for '{spec.name}' ({spec.timm_name}): they are not in the local Hugging Face cache "
            f"and the hub cannot be reached from this machine. Either download them where the network "
            f"allows (python -c \"import timm; timm.create_model('{spec.timm_name}', pretrained=True)\" fills "
            f"the cache in ~/.cache/huggingface, which you can copy here) or save the model's state dict and "
            f"pass it with --checkpoint PATH (.safetensors, .pth or .bin); or run the pipeline on seeded random "
            f"weights with --weights random for structural studies (accuracy is then meaningless).")


def load_model(name: str, *, weights: str = "pretrained", checkpoint: str | None = None,
               seed: int = 0) -> tuple[torch.nn.Module, ModelSpec, dict]:
    """Build the model in eval mode and load its weights.

    Returns (model, spec, info) where info records the weight source and its SHA-256
    (for the program's provenance).
    """
    spec = resolve(name)
    if weights not in ("pretrained", "random"):
        raise UserError(f"--weights must be 'pretrained' or 'random', not '{weights}'")
    import torch
    torch.manual_seed(seed)
    model = build(spec)
    info: dict = {"model": spec.name, "timm_name": spec.timm_name}
    if checkpoint is not None:
        load_checkpoint(model, checkpoint, spec)
        info.update(weights="checkpoint", checkpoint=str(checkpoint), checkpoint_sha256=_sha256(Path(checkpoint)))
    elif weights == "random":
        info.update(weights="random", seed=seed)
    elif spec.is_bundled:
        path = ASSET_DIR / spec.bundled
        if not path.is_file():
            raise UserError(f"the bundled weights {path} are missing; reinstall intsim")
        load_checkpoint(model, path, spec)
        info.update(weights="bundled", checkpoint=path.name, checkpoint_sha256=_sha256(path))
        record = path.with_suffix(".json")
        if record.is_file():
            r = json.loads(record.read_text())
            info["training"] = {k: r.get(k) for k in ("epochs_done", "epochs_planned", "complete",
                                                      "test_top1_full_10k", "training_minutes")}
    else:
        model = _timm_pretrained(spec)
        info.update(weights="timm-pretrained", tag=model.pretrained_cfg.get("tag"),
                    hf_hub_id=model.pretrained_cfg.get("hf_hub_id"))
    if spec.stress:
        from .stress import StressProfile, apply_stress
        profile = StressProfile()
        apply_stress(model, profile)
        info.update(stress_profile=profile.as_dict(),
                    note="synthetic stress variant: function-preserving per-channel rescale after LayerNorm")
    model.eval()
    return model, spec, info


def _timm_pretrained(spec: ModelSpec) -> torch.nn.Module:
    import huggingface_hub.constants as hf_constants
    import timm
    old = hf_constants.HF_HUB_OFFLINE
    hf_constants.HF_HUB_OFFLINE = True     # first the local cache only, without network retries
    try:
        return timm.create_model(spec.timm_name, pretrained=True)
    except Exception:
        pass
    finally:
        hf_constants.HF_HUB_OFFLINE = old
    if not _network_reachable():
        raise UserError(_no_weights_message(spec))
    try:
        return timm.create_model(spec.timm_name, pretrained=True)
    except Exception:
        raise UserError(_no_weights_message(spec)) from None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
