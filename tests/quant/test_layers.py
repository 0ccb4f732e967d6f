import pytest
import torch
import torch.nn.functional as F

from sensq.formats import quantize_dequantize
from sensq.models.layers import patches_to_rows
from sensq.quant import QuantLinear, QuantPatchConv3d, original_module, quantize_module, swap
from sensq.quant.layers import rows_to_patches


def test_quant_linear_is_w4a4_along_in_features():
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 40)
    x = torch.randn(3, 7, 96)
    q = QuantLinear.from_linear(linear, "hif4", "hif4")
    expected = F.linear(quantize_dequantize(x, "hif4"), quantize_dequantize(linear.weight.detach(), "hif4"),
                        linear.bias)
    assert torch.equal(q(x), expected)
    assert isinstance(q, torch.nn.Linear) and q.weight is linear.weight and q.bias is linear.bias
    back = q.to_linear()
    assert type(back) is torch.nn.Linear and back.weight is linear.weight and torch.equal(back(x), linear(x))
    assert set(q.state_dict()) == {"weight", "bias"}  # the same keys as the Linear: save_pretrained still loads


def test_none_formats_are_the_original_layer():
    linear = torch.nn.Linear(64, 16)
    x = torch.randn(5, 64)
    assert torch.equal(QuantLinear.from_linear(linear, None, None)(x), linear(x))


def test_swap_is_reversible_and_bit_identical():
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 8))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    old = swap(model, "2", quantize_module(model[2], "mxfp4", "mxfp4"))
    assert isinstance(model[2], QuantLinear)
    swap(model, "2", original_module(model[2]))
    assert type(model[2]) is torch.nn.Linear and model[2].weight is old.weight
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_patch_conv_round_trip_and_quantized_forward():
    torch.manual_seed(1)
    conv = torch.nn.Conv3d(16, 32, kernel_size=(1, 2, 2), stride=(1, 2, 2))
    x = torch.randn(1, 16, 3, 8, 8)
    rows = patches_to_rows(conv, x)
    assert rows.shape == (3 * 4 * 4, 64)
    assert torch.equal(rows_to_patches(conv, rows, x.shape), x)
    # the conv is the GEMM of its patches with the flattened weight
    gemm = rows @ conv.weight.reshape(32, -1).T + conv.bias
    direct = conv(x).permute(0, 2, 3, 4, 1).reshape(-1, 32)
    torch.testing.assert_close(gemm, direct, atol=1e-5, rtol=1e-5)
    q = quantize_module(conv, "hif4", "hif4")
    assert isinstance(q, QuantPatchConv3d) and q.to_conv().weight is conv.weight
    assert torch.equal(q.to_conv()(x), conv(x))
    expected = quantize_dequantize(rows, "hif4") @ quantize_dequantize(conv.weight.reshape(32, -1), "hif4").T
    got = q(x).permute(0, 2, 3, 4, 1).reshape(-1, 32) - conv.bias
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_clipping():
    from sensq.quant.layers import clip_rows

    x = torch.tensor([[1.0, -4.0, 2.0], [0.5, 0.25, -1.0]])
    assert torch.equal(clip_rows(x, 0.5), torch.tensor([[1.0, -2.0, 2.0], [0.5, 0.25, -0.5]]))
    assert clip_rows(x, 1.0) is x
    linear = torch.nn.Linear(64, 4)
    q = QuantLinear.from_linear(linear, "hif4", "hif4", weight_clip=0.8)
    assert torch.equal(q.weight_q, quantize_dequantize(clip_rows(linear.weight.detach(), 0.8), "hif4"))


def test_other_modules_are_refused():
    with pytest.raises(TypeError, match="cannot quantize a LayerNorm"):
        quantize_module(torch.nn.LayerNorm(4), "hif4", "hif4")
