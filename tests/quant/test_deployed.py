"""Deployed layers: packed weights only, decoded per forward, bit-identical to the simulation layers."""

import pytest
import torch
from conftest import awkward_tensor

from sensq.formats import get_format, pack, unpack
from sensq.formats.packing import unpack_into
from sensq.quant import QuantLinear, QuantPatchConv3d
from sensq.quant.deployed import (
    PackedLinear,
    PackedPatchConv3d,
    deploy_,
    is_deployed,
    release_scratch,
    scratch_bytes,
)
from sensq.testing import assert_bitexact

PAIRS = [("hif4", "hif4"), ("hif4", None), ("mxfp4", "mxfp4"), ("mxfp4_ocp", "mxfp4_ocp"), ("nvfp4", "nvfp4"),
         ("nvfp4_ts", "nvfp4_ts"), ("int4", "int8"), ("int8", "int8"), ("fp8_e4m3", "fp8_e4m3"), ("bf16", None)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(5, 100), (3, 64), (7, 1), (64, 300), (2, 129)])
def test_numba_decode_is_the_reference_unpack(shape, dtype):
    x = awkward_tensor(shape, sum(shape), dtype)  # zeros of both signs, NaN, inf, subnormals
    packed = pack(x, "hif4")
    assert_bitexact(unpack_into(packed, torch.empty(shape, dtype=dtype)), unpack(packed), f"{shape}")


@pytest.mark.parametrize("weight,act", PAIRS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_packed_linear_equals_the_simulation_layer(weight, act, dtype):
    torch.manual_seed(0)
    linear = torch.nn.Linear(200, 48).to(dtype)
    simulated = QuantLinear.from_linear(linear, weight, act, weight_clip=0.9, act_clip=0.95)
    deployed = PackedLinear.from_quant(simulated)
    x = torch.randn(3, 7, 200, dtype=dtype)
    with torch.no_grad():
        assert_bitexact(deployed(x), simulated(x), f"{weight}/{act}")
    assert deployed.bias is not None and not hasattr(deployed, "weight")


def test_a_group_size_is_part_of_the_packed_identity():
    torch.manual_seed(1)
    linear = torch.nn.Linear(128, 8)
    int4_g16 = get_format("int4", group_size=16)
    simulated = QuantLinear.from_linear(linear, int4_g16, None)
    deployed = PackedLinear.from_quant(simulated)
    assert deployed.weight_format.block_size == 16
    x = torch.randn(4, 128)
    with torch.no_grad():
        assert_bitexact(deployed(x), simulated(x), "int4 g16")
        assert not torch.equal(deployed(x), QuantLinear.from_linear(linear, "int4", None)(x))  # g128 differs


def test_resident_bytes_are_the_packed_bytes():
    linear = torch.nn.Linear(512, 256, dtype=torch.bfloat16)
    deployed = PackedLinear.from_quant(QuantLinear.from_linear(linear, "hif4", "hif4"))
    resident = sum(t.numel() * t.element_size() for t in deployed.state_dict().values())
    assert deployed.packed_bytes == 256 * 512 * 36 // 64
    assert resident == deployed.packed_bytes + 256 * 2  # the blocks and the bf16 bias, nothing else
    assert 8 * resident / linear.weight.numel() <= 4.6


def test_scratch_is_shared_and_released():
    release_scratch()
    layers = [PackedLinear.from_quant(QuantLinear.from_linear(torch.nn.Linear(k, 64), "hif4", "hif4"))
              for k in (64, 256, 128)]
    with torch.no_grad():
        x = torch.randn(2, 64)
        for layer in layers:
            x = torch.randn(2, layer.in_features)
            layer(x)
    assert scratch_bytes() == 256 * 64 * 4  # one buffer, the largest layer's size
    release_scratch()
    assert scratch_bytes() == 0


def test_with_autograd_the_decode_is_fresh_and_gradients_are_right():
    torch.manual_seed(2)
    a = PackedLinear.from_quant(QuantLinear.from_linear(torch.nn.Linear(64, 64), "hif4", None))
    b = PackedLinear.from_quant(QuantLinear.from_linear(torch.nn.Linear(64, 64), "hif4", None))
    x = torch.randn(3, 64, requires_grad=True)
    b(a(x)).sum().backward()
    expected = (torch.ones(3, 64) @ b.decoded_weight()) @ a.decoded_weight()
    assert torch.allclose(x.grad, expected, atol=1e-5)


def test_dtype_moves_keep_fp32_scales():
    linear = torch.nn.Linear(64, 16)
    simulated = QuantLinear.from_linear(linear, "int4", None)
    deployed = PackedLinear.from_quant(simulated).to(torch.bfloat16)
    simulated = simulated.to(torch.bfloat16)
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        assert_bitexact(deployed(x), simulated(x), "int4 after .to(bf16)")


@pytest.mark.parametrize("weight,act", [("hif4", "hif4"), ("nvfp4", None)])
def test_packed_patch_conv_equals_the_simulation_layer(weight, act):
    torch.manual_seed(3)
    conv = torch.nn.Conv3d(16, 32, kernel_size=(1, 2, 2), stride=(1, 2, 2))
    simulated = QuantPatchConv3d.from_conv(conv, weight, act)
    deployed = PackedPatchConv3d.from_quant(simulated)
    x = torch.randn(1, 16, 3, 8, 8)
    with torch.no_grad():
        assert_bitexact(deployed(x), simulated(x), f"conv {weight}/{act}")


def test_deploy_replaces_only_weight_quantized_layers():
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64), torch.nn.Linear(64, 8))
    model[0] = QuantLinear.from_linear(model[0], "hif4", "hif4")
    model[1] = QuantLinear.from_linear(model[1], None, "hif4")  # activation only: the weight stays dense
    x = torch.randn(5, 64)
    with torch.no_grad():
        expected = model(x)
        assert deploy_(model) == 1
        assert is_deployed(model[0]) and isinstance(model[1], QuantLinear) and type(model[2]) is torch.nn.Linear
        assert_bitexact(model(x), expected, "deployed model")


def test_fused_kernel_reads_the_packed_blocks_as_the_simulation_does():
    pytest.importorskip("triton")  # CPU: TRITON_INTERPRET=1 (tests/conftest.py)
    torch.manual_seed(4)
    linear = torch.nn.Linear(130, 40)
    simulated = QuantLinear.from_linear(linear, "hif4", "hif4", backend="triton", weight_clip=0.9, act_clip=0.95)
    deployed = PackedLinear.from_quant(simulated)
    assert deployed._fused(torch.zeros(1)) and simulated.fused
    x = torch.randn(3, 7, 130)
    with torch.no_grad():
        assert_bitexact(deployed(x), simulated(x), "fused")
