"""The calibration methods a plan rule or ``--calibrate`` names: one typed entry each in :data:`METHODS`.

A method is what it does to a layer's operands, read by :mod:`sensq.quant.calibrate`: an optional Hadamard
rotation of both operands (``rotate``), then the weights' rounding (the format's own rule, the clip factor with
the lowest MSE, or GPTQ) and the activations' (own rule or MSE clip). Whether it needs captured inputs follows
from that. A new method that combines these steps is one :func:`register_calibration` call; the CLI's choices
and help are read from here.
"""

from __future__ import annotations

from dataclasses import dataclass

WEIGHT_STEPS: dict[str, bool] = {"none": False, "mse": True, "gptq": True}
"""How a method rounds weights, by name -> whether the step needs captured inputs. Each name's implementation is
registered with :func:`sensq.quant.calibrate.register_weight_step` (which adds the name here)."""
ACTIVATION_STEPS: dict[str, bool] = {"none": False, "mse": True}


@dataclass(frozen=True)
class Calibration:
    """One method: ``rotate`` both operands of a Linear first; ``weights`` and ``activations`` as
    :data:`WEIGHT_STEPS` / :data:`ACTIVATION_STEPS` name them (GPTQ falls back to ``mse`` for a weight format it
    does not round: the manifest records what each layer got)."""

    name: str
    weights: str
    activations: str
    rotate: bool = False
    help: str = ""

    @property
    def needs_data(self) -> bool:
        """Needs captured inputs (a probe file): a step that does (the rotation and the format's own rule do not)."""
        return WEIGHT_STEPS[self.weights] or ACTIVATION_STEPS[self.activations]

    def applied(self, rotated: bool, weights: str) -> str:
        """The label a layer records: the method's name when the layer got every step, else what it got
        (``rotate-mse`` when GPTQ fell back, ``gptq`` when the layer could not be rotated)."""
        if rotated == self.rotate and weights == self.weights:
            return self.name
        base = "none" if weights == "none" and self.activations == "none" else weights
        if not rotated:
            return base
        return "rotate" if base == "none" else f"rotate-{base}"


METHODS: dict[str, Calibration] = {}


def register_calibration(method: Calibration) -> Calibration:
    """Add a method (a combination of a rotation, a weight step and an activation step): plan rules,
    ``--calibrate`` and the manifest take it by name.

    Raises:
        ValueError: a step that is not registered.
    """
    if method.weights not in WEIGHT_STEPS or method.activations not in ACTIVATION_STEPS:
        raise ValueError(f"calibration {method.name!r}: weights in {tuple(WEIGHT_STEPS)}, activations in "
                         f"{tuple(ACTIVATION_STEPS)}")
    METHODS[method.name] = method
    return method


for _method in (
    Calibration("none", "none", "none", help="the format's own scale rule (bit-exact golden semantics)"),
    Calibration("mse", "mse", "mse", help="per layer, the clipping factor of weights and activations that "
                "minimizes their quantization MSE (the curves go into the manifest)"),
    Calibration("gptq", "gptq", "mse", help="activations as mse, 4-bit and K-quant weights rounded by GPTQ onto the "
                "format's own block grid with the error propagated (other weights as mse)"),
    Calibration("rotate", "none", "none", rotate=True, help="both operands of each Linear rotated by a "
                "block-diagonal Hadamard of size 64 before the format's rule (spreads outlier channels; no probe "
                "needed)"),
    Calibration("rotate-gptq", "gptq", "mse", rotate=True, help="the rotation, then gptq"),
):
    register_calibration(_method)


def unregister_calibration(name: str) -> None:
    """Remove a method added by :func:`register_calibration` (tests)."""
    METHODS.pop(name, None)


def needs_data(name: str | None) -> bool:
    """Whether the method ``name`` needs captured inputs (None, a rule without a calibration: no)."""
    return name is not None and METHODS[name].needs_data


def calibration_help() -> str:
    """``name: what it does`` for every registered method, for the CLI."""
    return "; ".join(f"{m.name}: {m.help}" for m in METHODS.values())
