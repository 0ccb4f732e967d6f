"""GPTQ onto a block format's own grid: lower output error than rounding, exact storage, per-rule calibration."""

import pytest
import torch

from sensq.errors import InputError
from sensq.formats import get_format, pack, quantize_dequantize, reference, unpack
from sensq.formats.blocks import to_blocks
from sensq.quant.gptq import gptq_pack

FORMATS = ["hif4", "mxfp4", "mxfp4_ocp", "nvfp4", "int4", "q4_k", "q6_k"]


def _correlated_inputs(n=512, width=200, seed=0):
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(width, width, generator=generator) / width**0.5 + torch.eye(width)
    x = torch.randn(n, width, generator=generator) @ mixing
    x[:, 3] *= 20  # an outlier channel, as diffusion transformers have
    return x


@pytest.mark.parametrize("fmt", FORMATS)
def test_gptq_has_lower_output_error_than_rounding(fmt):
    weight = torch.randn(96, 200, generator=torch.Generator().manual_seed(1))
    x = _correlated_inputs()
    spec = get_format(fmt)
    gptq = unpack(gptq_pack(weight, x, spec))
    rounded = quantize_dequantize(weight, spec)

    def output_error(q):
        return float(((x @ (weight - q).T) ** 2).mean())

    assert output_error(gptq) < 0.6 * output_error(rounded)


@pytest.mark.parametrize("fmt", FORMATS)
def test_gptq_with_uncorrelated_inputs_is_nearest_rounding_under_the_formats_own_scales(fmt):
    """H diagonal: no error to propagate, every block's metadata is the format's own, and each element goes to
    the nearest value that metadata represents. That is the format's own rounding, except where the format
    rounds by an approximate reciprocal (HiF4 multiplies by bf16(1/scale)): there GPTQ is strictly nearer."""
    weight = torch.randn(32, 192, generator=torch.Generator().manual_seed(2))
    spec = get_format(fmt)
    gptq = unpack(gptq_pack(weight, torch.eye(192) * 3.0, spec))
    rounded = quantize_dequantize(weight, spec)
    differ = gptq != rounded
    assert ((weight - gptq).abs()[differ] < (weight - rounded).abs()[differ]).all()
    assert differ.float().mean() < (0.01 if fmt == "hif4" else 1e-9)


@pytest.mark.parametrize("fmt", ["hif4", "nvfp4", "int4", "q6_k"])
def test_the_gptq_weight_is_stored_in_the_formats_layout(fmt):
    """Same bytes as the format's own packing, a tail block included, and the deployed decode (numba for HiF4)
    reads it as the reference does."""
    from sensq.formats.packing import pack_encoded, unpack_into

    spec = get_format(fmt)
    weight = torch.randn(40, 130, generator=torch.Generator().manual_seed(3))
    packed = gptq_pack(weight, _correlated_inputs(width=130), spec)
    q = unpack(packed)
    assert q.shape == weight.shape and packed.nbytes == pack(weight, spec).nbytes
    assert torch.equal(unpack_into(packed, torch.empty(weight.numel())), q)
    encoded = reference.encode(to_blocks(weight, -1, spec.block_size)[0], spec)  # pack = encode + pack_encoded
    own = pack_encoded(encoded, spec, tuple(weight.shape), 1, weight.dtype)
    assert all(torch.equal(own.data[k], v) for k, v in pack(weight, spec).data.items())


def test_gptq_refuses_what_it_cannot_round():
    weight, rows = torch.randn(8, 64), torch.randn(16, 64)
    with pytest.raises(InputError, match="gptq rounds 4-bit weights"):
        gptq_pack(weight, rows, get_format("fp8_e4m3"))
    with pytest.raises(InputError, match="per-tensor scale"):
        gptq_pack(weight, rows, get_format("nvfp4_ts"))
    with pytest.raises(InputError, match="NaN or Inf"):
        gptq_pack(weight, torch.full((16, 64), float("nan")), get_format("hif4"))
    with pytest.raises(InputError, match=r"weight \[out, in\] and inputs \[n, in\]"):
        gptq_pack(weight, torch.randn(16, 32), get_format("hif4"))


def test_dead_input_channels_do_not_break_the_factorization():
    weight = torch.randn(16, 128)
    rows = torch.randn(64, 128)
    rows[:, 10:20] = 0  # channels that never see input
    q = unpack(gptq_pack(weight, rows, get_format("hif4")))
    assert torch.isfinite(q).all()
