"""The formats API: registry, dtype/shape contract, bad input, backends."""

import pytest
import torch

from sensq.errors import BackendUnavailableError, FormatError, InputError
from sensq.formats import Backend, format_names, get_format, quantize_dequantize
from sensq.formats.spec import Family
from sensq.testing import assert_bitexact

ALL = format_names()


def test_registry_has_the_contract_names():
    assert {"hif4", "mxfp4", "nvfp4", "int4", "int8", "fp8_e4m3", "bf16"} <= set(ALL)


def test_unknown_format_lists_the_known_ones():
    with pytest.raises(FormatError, match=r"unknown format 'hif5'; known formats: hif4, mxfp4"):
        get_format("hif5")


def test_group_size_option():
    assert get_format("int4", group_size=64).block_size == 64
    assert get_format("int8", group_size=None).block_size is None
    assert get_format("fp8_e4m3", group_size=128).block_size == 128
    assert get_format("hif4", group_size=64) is get_format("hif4")
    with pytest.raises(FormatError, match="fixed block size of 64; got group_size=32"):
        get_format("hif4", group_size=32)
    with pytest.raises(FormatError, match="positive int or None"):
        get_format("int4", group_size=0)


def test_identity_names_the_group_size_and_round_trips():
    for name in format_names():
        spec = get_format(name)
        assert spec.identity == name and get_format(spec.identity) == spec
    assert get_format("int4", group_size=16).identity == "int4@16"
    assert get_format("fp8_e4m3", group_size=None).identity == "fp8_e4m3"  # per channel is its default
    assert get_format("fp8_e4m3", group_size=128).identity == "fp8_e4m3@128"
    for identity in ("int4@16", "int8@64", "fp8_e4m3@32", "int4@channel"):
        assert get_format(identity).identity == identity
    assert get_format("int4@16").block_size == 16 and get_format("int4@channel").block_size is None
    for bad in ("int4@0", "int4@x", "int4@", "int4@-8"):
        with pytest.raises(FormatError, match="positive number or 'channel'"):
            get_format(bad)
    with pytest.raises(FormatError, match="names group size 16"):
        get_format("int4@16", group_size=32)
    with pytest.raises(FormatError):
        get_format("hif4@16")  # hif4 has no group-size option


def test_bits_per_element():
    assert get_format("hif4").bits_per_element() == 4.5
    assert get_format("mxfp4").bits_per_element() == 4.25
    assert get_format("nvfp4").bits_per_element() == 4.5
    assert get_format("int8").bits_per_element(5120) == 8 + 32 / 5120
    with pytest.raises(FormatError, match="dim_length"):
        get_format("int8").bits_per_element()


@pytest.mark.parametrize("fmt", ALL)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_keeps_dtype_shape_and_reduces_error(fmt, dtype):
    x = torch.randn(3, 5, 130, generator=torch.Generator().manual_seed(0)).to(dtype)
    y = quantize_dequantize(x, fmt)
    assert y.dtype == dtype and y.shape == x.shape
    error = (y.double() - x.double()).pow(2).mean() / x.double().pow(2).mean()
    assert error < 0.05, f"{fmt} {dtype}: nmse {error:.3g}"


@pytest.mark.parametrize("fmt", ALL)
def test_dim_is_honoured(fmt):
    x = torch.randn(70, 40, generator=torch.Generator().manual_seed(1))
    along0 = quantize_dequantize(x, fmt, dim=0)
    assert_bitexact(along0, quantize_dequantize(x.T.contiguous(), fmt, dim=-1).T.contiguous(), fmt)
    assert_bitexact(quantize_dequantize(x, fmt, dim=-2), along0, fmt)


@pytest.mark.parametrize("fmt", ALL)
def test_non_contiguous_input_is_read_as_is(fmt):
    base = torch.randn(64, 300, generator=torch.Generator().manual_seed(2))
    view = base[:, ::2]
    assert not view.is_contiguous()
    assert_bitexact(quantize_dequantize(view, fmt), quantize_dequantize(view.contiguous(), fmt), fmt)


def test_tail_is_zero_padded():
    x = torch.randn(4, 100, generator=torch.Generator().manual_seed(3))
    padded = torch.nn.functional.pad(x, (0, 28))
    for fmt in ("hif4", "mxfp4", "nvfp4", "int4"):
        assert_bitexact(quantize_dequantize(x, fmt), quantize_dequantize(padded, fmt)[:, :100].contiguous(), fmt)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int8, torch.bool, torch.complex64])
def test_non_floating_dtype_is_refused(dtype):
    x = torch.zeros(4, 64, dtype=dtype)
    with pytest.raises(InputError, match=rf"cannot quantize a {dtype} tensor.*x.float\(\)"):
        quantize_dequantize(x, "hif4")


def test_dim_out_of_range_is_refused():
    with pytest.raises(InputError, match=r"dim=2 is out of range for a 2-d tensor of shape \(4, 64\)"):
        quantize_dequantize(torch.zeros(4, 64), "hif4", dim=2)


def test_zero_dim_tensor_is_refused():
    with pytest.raises(InputError, match="0-d tensor"):
        quantize_dequantize(torch.tensor(1.0), "hif4")


@pytest.mark.parametrize("shape", [(0,), (0, 64), (3, 0)])
def test_empty_tensor_returns_an_empty_copy(shape):
    x = torch.zeros(shape)
    y = quantize_dequantize(x, "hif4")
    assert y.shape == x.shape and y.dtype == x.dtype and y is not x  # empty storage has no address to compare


def test_not_a_tensor_is_refused():
    with pytest.raises(InputError, match="expected a torch.Tensor, got list"):
        quantize_dequantize([1.0, 2.0], "hif4")


@pytest.mark.parametrize("fmt", ["int4", "int8", "fp8_e4m3"])
def test_scaled_formats_poison_non_finite_groups(fmt):
    x = torch.ones(2, 128)
    x[0, 3] = float("inf")
    y = quantize_dequantize(x, get_format(fmt, group_size=64))
    assert torch.isnan(y[0, :64]).all() and torch.isfinite(y[0, 64:]).all() and torch.isfinite(y[1]).all()


def test_signed_zero_rules():
    """4-bit formats map x = +-0 to +0.0 (HiF4 spec §3 step 10); INT has no -0; FP8, MXFP8 (E4M3 elements) and
    BF16 keep -0; Q4_K's unsigned codes decode to +0."""
    x = torch.zeros(2, 128)
    x[1] = -0.0
    for fmt in ALL:
        y = quantize_dequantize(x, fmt)
        assert torch.equal(y, torch.zeros_like(y)), fmt
        keeps_sign = get_format(fmt).family in (Family.FP8, Family.MXFP8, Family.BF16)
        assert torch.equal(torch.signbit(y), torch.signbit(x) & keeps_sign), fmt


def test_bf16_is_the_identity_on_bf16_and_rounds_fp32():
    x = torch.randn(8, 64).to(torch.bfloat16)
    assert_bitexact(quantize_dequantize(x, "bf16"), x, "bf16")
    x32 = torch.randn(8, 64)
    assert_bitexact(quantize_dequantize(x32, "bf16"), x32.to(torch.bfloat16).float(), "bf16")
    assert get_format("bf16").family is Family.BF16


def test_unknown_backend():
    expected = "unknown backend 'cuda'; known backends: auto, reference, cpu, triton"
    with pytest.raises(BackendUnavailableError, match=expected):
        quantize_dequantize(torch.zeros(4, 64), "hif4", backend="cuda")


def test_cpu_backend_refuses_formats_it_lacks():
    with pytest.raises(BackendUnavailableError, match="no kernel for format 'bf16'.*backend='reference'"):
        quantize_dequantize(torch.zeros(4, 64), "bf16", backend=Backend.CPU)


def test_cpu_backend_without_numba_is_a_clear_error(monkeypatch):
    from sensq.formats import backend

    backend.available(Backend.CPU, "cpu")  # read the registry, then patch it
    monkeypatch.setitem(backend._AVAILABLE, Backend.CPU, lambda device_type: False)
    with pytest.raises(BackendUnavailableError, match="needs numba.*pip install numba.*backend='reference'"):
        quantize_dequantize(torch.zeros(4, 64), "hif4", backend="cpu")
    # auto quietly uses the reference: same bits, so nothing the user asked for changes
    x = torch.randn(4, 64)
    assert_bitexact(quantize_dequantize(x, "hif4"), quantize_dequantize(x, "hif4", backend="reference"), "auto")


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_mxfp4_ocp_uses_the_exact_floor_log2_below_a_power_of_two(backend):
    """OCP MX: X = 2^(floor(log2 amax) - 2) with the exact floor. For amax = 8 - ulp that is 2^0, the block
    scales to 7.9999995 and saturates at 6: 6.0. torch.floor(torch.log2(8 - ulp)) is 3 (float32 log2 rounds
    up to 3.0), which would give X = 2 and keep 8.0; the repo variant `mxfp4` does follow torch's log2 (its
    reference does)."""
    if backend == "cpu":
        pytest.importorskip("numba")
    below = torch.tensor(8.0).nextafter(torch.tensor(0.0))
    assert torch.floor(torch.log2(below)) == 3  # the trap
    x = torch.zeros(1, 32)
    x[0, 0] = below
    assert quantize_dequantize(x, "mxfp4_ocp", backend=backend)[0, 0] == 6.0
    x[0, 0] = 8.0
    assert quantize_dequantize(x, "mxfp4_ocp", backend=backend)[0, 0] == 8.0


def test_the_kernel_registry_is_filled_by_the_installed_entry_point():
    """sensq.formats names no kernel module: the families each backend runs come from what
    ``sensq.kernels:register`` declared (a stale install without the entry point shows up here)."""
    from sensq.formats.backend import families

    assert families(Backend.CPU) == {Family.HIF4, Family.MXFP4, Family.NVFP4, Family.INT, Family.FP8}
    assert families(Backend.TRITON) == {Family.HIF4, Family.MXFP4, Family.NVFP4}
    assert families(Backend.CPU, "unpack") == {Family.HIF4}


def test_a_kernel_for_an_unknown_op_is_refused():
    from sensq.formats.backend import register_kernel

    with pytest.raises(ValueError, match="unknown kernel op 'gemm'"):
        register_kernel(Backend.CPU, Family.HIF4, "gemm", "x:y")
