"""A new number format is one module: a FormatSpec and a Codec passed to register_format. This file is that
module for a ternary format (BitNet b1.58's {-1, 0, 1} x the block's mean |x|, blocks of 32), and checks that
quantization, packing, plans, apply-plan, checkpoints and `sensq formats` take it with nothing else changed."""

from __future__ import annotations

import pytest
import torch

from sensq.formats import (
    Codec,
    Family,
    FormatSpec,
    ScaleType,
    format_names,
    pack,
    quantize_dequantize,
    register_format,
    unpack,
    unregister_format,
)
from sensq.formats.packing import stored_bytes
from sensq.formats.reference import Encoded

TERNARY = FormatSpec(name="ternary", family=Family.INT, element="T", element_bits=2, block_size=32,
                     scale=ScaleType.FP32, scale_bits=32, max_value=3.4028234663852886e38, min_nonzero=2.0**-149,
                     n_values=3, qmax=1, summary="ternary {-1, 0, 1} x the block's mean |x| (BitNet b1.58)")


def _encode(blocks: torch.Tensor, spec: FormatSpec) -> Encoded:
    scale = blocks.abs().mean(-1)
    scale = torch.where(scale > 0, scale, 1.0)
    q = torch.clamp(torch.round(blocks / scale[..., None]), -1, 1)
    return Encoded(q.to(torch.int8).view(torch.uint8), {"scale": scale})


def _decode(encoded: Encoded, spec: FormatSpec) -> torch.Tensor:
    return encoded.codes.view(torch.int8).to(torch.float32) * encoded.meta["scale"][..., None]


@pytest.fixture
def ternary():
    register_format(TERNARY, Codec(_encode, _decode))
    yield TERNARY
    unregister_format(TERNARY.name)


def test_quantize_and_pack_follow_the_codec(ternary):
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(0))
    blocks = x.reshape(6, 2, 32)
    scale = blocks.abs().mean(-1, keepdim=True)
    expected = (torch.clamp(torch.round(blocks / scale), -1, 1) * scale).reshape(6, 64)
    assert torch.equal(quantize_dequantize(x, "ternary"), expected)  # the reference codec, never an INT kernel
    packed = pack(x, "ternary")
    assert torch.equal(unpack(packed), expected)
    assert packed.data["codes"].numel() == stored_bytes(ternary, packed.layout)["codes"] == 6 * 64
    assert "ternary" in format_names()


def test_plans_checkpoints_and_the_formats_table_take_it(ternary, tmp_path):
    from click.testing import CliRunner

    from sensq.cli import main
    from sensq.loading import load_model
    from sensq.plan import Plan, Rule
    from sensq.quant.apply import apply_plan
    from sensq.quant.checkpoint import load_quantized, save_quantized
    from sensq.trajectory import Trajectory, apply_trajectory, run

    model = load_model("tiny", torch.device("cpu"), torch.float32)
    trajectory = Trajectory(steps=2).with_resolution(model.default_resolution)
    apply_trajectory(model.pipe, trajectory)
    plan = Plan([Rule("re:(high|low):blocks\\..*", "ternary", "ternary"), Rule("re:.*", None, None)])
    _, calibration = apply_plan(model, plan)
    expected = run(model.pipe, "a red ball", trajectory, seed=1)
    manifest = save_quantized(model, tmp_path / "ckpt", plan=plan, calibration=calibration)
    assert {entry["weight"] for entry in manifest["layers"].values()} == {"ternary"}
    loaded = load_quantized(tmp_path / "ckpt")
    apply_trajectory(loaded.pipe, trajectory)
    assert torch.equal(run(loaded.pipe, "a red ball", trajectory, seed=1), expected)
    listed = CliRunner().invoke(main, ["formats"])
    assert listed.exit_code == 0 and "ternary" in listed.output
