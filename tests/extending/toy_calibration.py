"""A calibration method in one module: a weight step that needs no data (the weight clipped to 90% of its range
before the format's own rule) and the method that uses it (activations by the format's own rule)."""

from sensq.metrics import nmse
from sensq.plan.calibrations import Calibration, register_calibration, unregister_calibration
from sensq.quant.calibrate import WeightRounding, register_weight_step, unregister_weight_step
from sensq.quant.layers import fake_quantize

CLIP = 0.9


def clip_weights(weight, rows, fmt, backend, dtype) -> WeightRounding:
    """The deployed layer applies ``clip`` (the format's rule on the clipped weight); the manifest records it."""
    return WeightRounding("fixed-clip", CLIP, nmse(weight, fake_quantize(weight, fmt, CLIP, backend)))


def register() -> None:
    register_weight_step("fixed-clip", clip_weights, needs_data=False)
    register_calibration(Calibration("toy-clip", "fixed-clip", "none", help="weights clipped to 90%, no data"))


def unregister() -> None:
    unregister_calibration("toy-clip")
    unregister_weight_step("fixed-clip")


register()
