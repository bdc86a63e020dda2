"""DopQ-ViT post-training calibration of timm ViTs and Swin Transformers into integer programs.

    from calib import calibrate, CalibConfig
    program = calibrate(model, images_uint8, mean, std, CalibConfig(wbits=4, abits=4))
    intsim.program.format.save(program, "deit_tiny_w4a4.intsim")

Modules: ``archs`` (the architecture registry; ``calibrate`` dispatches through it), ``vit`` and
``swin`` (the drivers: walk the model, emit the graph), ``common`` (what the drivers share: post-LN
calibration, block quantizers, fake-quant block forward, block graph, bounds), ``config``
(CalibConfig), ``observers`` (memory-bounded activation samples), ``uniform`` (activation /
weight quantizers and their searches), ``reparam`` (MOSF / mean post-LN reparameterization),
``softmax_search`` (post-softmax quantizer parameters), ``state`` (calibration results),
``reconstruct`` (optional block reconstruction, ViT / DeiT). Each op's integer constants are
computed by its module ``intsim.ops.<type>.export`` into an ``intsim.program.builder.ProgramBuilder``.
"""
from intsim.program.fixedpoint import ExportError

from .archs import calibrate
from .config import CalibConfig

__all__ = ["CalibConfig", "ExportError", "calibrate"]
