"""DopQ-ViT post-training calibration of timm ViTs and export to an integer program.

    from calib import calibrate, CalibConfig
    program = calibrate(model, images_uint8, mean, std, CalibConfig(wbits=4, abits=4))
    intsim.program.format.save(program, "deit_tiny_w4a4.intsim")

Modules: ``config`` (CalibConfig), ``observers`` (memory-bounded activation samples),
``uniform`` (activation / weight quantizers and their searches), ``reparam`` (MOSF / mean
post-LN reparameterization), ``softmax_search`` (post-softmax quantizer parameters),
``fixedpoint`` (multiplier / shift), ``export`` (integerization), ``pipeline`` (the driver),
``swin`` (timm Swin Transformers: driver and export; ``calibrate`` dispatches to it).
"""
from .config import CalibConfig
from intsim.program.fixedpoint import ExportError
from .pipeline import calibrate

__all__ = ["CalibConfig", "ExportError", "calibrate"]
