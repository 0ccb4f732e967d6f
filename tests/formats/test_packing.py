"""Packed storage: exact round trip, the HiF4 byte layout of spec §6, true sizes, files."""

import pytest
import torch

from sensq.errors import InputError
from sensq.formats import PackedTensor, format_names, get_format, pack, quantize_dequantize, unpack
from sensq.testing import assert_bitexact


def _awkward(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(33, 200, generator=g) * torch.logspace(-3, 3, 200)
    x[0, 5] = float("nan")
    x[1, 3] = float("inf")
    x[2, 9] = float("-inf")
    x[4] = 0.0
    x[5, 7] = -0.0
    x[6, :64] = 1e-30
    return x.to(dtype)


@pytest.mark.parametrize("fmt", format_names())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("dim", [-1, 0])
def test_unpack_pack_equals_quantize_dequantize(fmt, dtype, dim):
    x = _awkward(dtype)
    assert_bitexact(unpack(pack(x, fmt, dim=dim)), quantize_dequantize(x, fmt, dim=dim, backend="reference"), fmt)


@pytest.mark.parametrize("group", [None, 7, 64])
def test_int4_odd_and_per_channel_groups_round_trip(group):
    fmt = get_format("int4", group_size=group)
    x = _awkward(torch.float32)
    assert_bitexact(unpack(pack(x, fmt)), quantize_dequantize(x, fmt), str(group))


def test_hif4_is_36_bytes_per_64_values():
    packed = pack(torch.randn(128, 256), "hif4")
    assert packed.data["blocks"].shape == (128, 4, 36)
    assert packed.nbytes * 8 / (128 * 256) == 4.5


def test_hif4_byte_layout_matches_spec_section_6():
    # one block: element 0 = -3.5 (max), element 9 = 0.25, element 40 = 1.0, rest 0
    x = torch.zeros(64)
    x[0], x[9], x[40] = -3.5, 0.25, 1.0
    block = pack(x, "hif4").data["blocks"].reshape(36)
    # M = 3.5: s = bf16(3.5 * 0.142578125 = 0.4990234375) = 0.5 -> E6M2 0.5 = 2^-1 (E=-1, m=0) -> code (47 << 2)
    assert block[0].item() == 47 << 2
    # rec = 2: 8-block 0: 3.5 * 2 = 7 >= 4 -> lv2 bit 0 set; 8-block 5 (element 40): 1 * 2 = 2 < 4
    assert block[1].item() == 0b00000001
    # lv3: 4-block 0: 7 / 2 = 3.5 >= 2 -> bit 0; 4-block 2 (element 9): 0.5 / 2 < 2; 4-block 10: 2 / 1 >= 2 -> bit 10
    lv3 = block[2].item() | (block[3].item() << 8)
    assert lv3 == (1 << 0) | (1 << 10)
    codes = block[4:]
    # element 0: t = 3.5 / 2 / 2 * 2 = 1.75 -> m = 7, negative -> nibble 0xF in the low half of byte 0
    assert codes[0].item() & 0xF == 0xF
    # element 9: lv2 = lv3 = 1, t = 0.25 * 2 = 0.5 -> m = 2, in the high nibble of byte 4
    assert codes[4].item() >> 4 == 2
    # element 40: lv3 = 2, t = 1 / 2 * 2 = 1 -> m = 4, low nibble of byte 20
    assert codes[20].item() & 0xF == 4
    assert unpack(pack(x, "hif4"))[[0, 9, 40]].tolist() == [-3.5, 0.25, 1.0]


def test_nan_block_is_scale_0xff():
    x = torch.ones(128)
    x[70] = float("nan")
    blocks = pack(x, "hif4").data["blocks"]
    assert blocks[0, 1, 0].item() == 0xFF and blocks[0, 0, 0].item() != 0xFF


@pytest.mark.parametrize("fmt", ["hif4", "nvfp4_ts", "int4", "bf16"])
def test_save_and_load(tmp_path, fmt):
    x = _awkward(torch.bfloat16)
    packed = pack(x, fmt, dim=0)
    path = tmp_path / "w.safetensors"
    packed.save(path)
    loaded = PackedTensor.load(path)
    assert loaded.fmt == packed.fmt and loaded.shape == packed.shape and loaded.dtype == torch.bfloat16
    assert loaded.nbytes == packed.nbytes
    assert_bitexact(unpack(loaded), unpack(packed), fmt)
    assert not (tmp_path / "w.safetensors.tmp").exists()


def test_load_errors(tmp_path):
    with pytest.raises(InputError, match="packed tensor file not found: '.*nope.safetensors'"):
        PackedTensor.load(tmp_path / "nope.safetensors")
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(InputError, match="is not a sensq packed tensor"):
        PackedTensor.load(tmp_path / "plain.safetensors")


def test_empty_tensor_cannot_be_packed():
    with pytest.raises(InputError, match=r"cannot pack an empty tensor of shape \(0, 64\)"):
        pack(torch.zeros(0, 64), "hif4")


def test_storage_is_true_bytes():
    x = torch.randn(64, 512)
    assert pack(x, "mxfp4").nbytes == 64 * 512 // 2 + 64 * 16
    assert pack(x, "nvfp4").nbytes == 64 * 512 // 2 + 64 * 32
    assert pack(x, "nvfp4_ts").nbytes == 64 * 512 // 2 + 64 * 32 + 4
    assert pack(x, "int8").nbytes == 64 * 512 + 64 * 4
    assert pack(x, "bf16").nbytes == 64 * 512 * 2
