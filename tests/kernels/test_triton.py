"""The triton backend against the reference: bit-exact quantize and pack, and the fused W4A4 linear.

On CPU the kernels run under TRITON_INTERPRET=1 with small shapes; the same tests with real shapes are
marked ``gpu`` and run only on a CUDA GPU.
"""

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")  # without a GPU, tests/conftest.py has set TRITON_INTERPRET=1

from conftest import awkward_tensor, golden_cases, load_golden  # noqa: E402

from sensq.errors import BackendUnavailableError  # noqa: E402
from sensq.formats import Backend, get_format, pack, quantize_dequantize, unpack  # noqa: E402
from sensq.formats.blocks import to_blocks  # noqa: E402
from sensq.formats.reference import encode  # noqa: E402
from sensq.kernels import triton_hif4  # noqa: E402
from sensq.testing import assert_bitexact  # noqa: E402

HIF4 = get_format("hif4")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _awkward(shape, seed=0, dtype=torch.float32):
    return awkward_tensor(shape, seed, dtype)


@pytest.mark.parametrize("name", [n for n in golden_cases() if load_golden(n)[2]["format"] == "hif4"])
def test_golden(name):
    x, expected, meta = load_golden(name)
    got = quantize_dequantize(x.to(DEVICE), "hif4", dim=meta["axis"], backend="triton").cpu()
    assert_bitexact(got, expected, name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("shape,dim", [((1, 1), -1), ((3, 63), -1), ((100, 130), -1), ((130, 7), 0),
                                       ((2, 65, 33), 1)])
def test_quantize_equals_reference(dtype, shape, dim):
    x = _awkward(shape, seed=sum(shape), dtype=dtype)
    assert_bitexact(quantize_dequantize(x.to(DEVICE), "hif4", dim=dim, backend="triton").cpu(),
                    quantize_dequantize(x, "hif4", dim=dim, backend="reference"), f"{shape} {dtype}")


@pytest.mark.parametrize("shape,dim", [((5, 100), 1), ((3, 64), 1), ((17, 200), 1), ((1, 1), 1), ((130, 7), 0)])
def test_pack_blocks_are_the_bytes_of_sensq_pack(shape, dim):
    x = _awkward(shape, seed=3)
    x[0, 0] = float("nan")  # a NaN block: scale code 0xFF, zero codes
    blocks = triton_hif4.pack_blocks(x.to(DEVICE), dim=dim).cpu()
    assert torch.equal(blocks, pack(x, "hif4", dim=dim).data["blocks"])
    encoded = encode(to_blocks(x, dim, 64)[0], HIF4)
    assert torch.equal(blocks[..., 0].int(), encoded.meta["scale"].int())
    assert torch.equal(blocks[..., 2].int() | (blocks[..., 3].int() << 8), encoded.meta["lv3"].int())


LINEAR_TOLERANCE = "|out - ref| <= K * 2^-23 * (|Q(x)| @ |W|^T) + 1e-6 (fp32 accumulation order)"


@pytest.mark.parametrize("m,k,n", [(1, 64, 48), (100, 200, 64), (37, 100, 80), (64, 130, 16)])
@pytest.mark.parametrize("bias", [True, False])
def test_fused_linear_matches_f_linear_on_dequantized_operands(m, k, n, bias):
    g = torch.Generator().manual_seed(m + k + n)
    x = torch.randn(m, k, generator=g)
    weight = torch.randn(n, k, generator=g) * 0.1
    b = torch.randn(n, generator=g) if bias else None
    blocks = triton_hif4.pack_blocks(weight.to(DEVICE), dim=1)
    out = triton_hif4.hif4_linear(x.to(DEVICE), blocks, b.to(DEVICE) if bias else None, n).cpu()
    x_q, w_q = quantize_dequantize(x, "hif4"), unpack(pack(weight, "hif4"))
    reference = F.linear(x_q, w_q, b)
    bound = (x_q.abs() @ w_q.abs().T) * k * 2.0**-23 + 1e-6
    assert ((out - reference).abs() <= bound).all(), LINEAR_TOLERANCE


def test_unavailable_triton_is_a_clear_error(monkeypatch):
    from sensq.formats import backend

    backend.available(Backend.TRITON, "cpu")  # read the registry, then patch it
    monkeypatch.setitem(backend._AVAILABLE, Backend.TRITON, lambda device_type: False)
    with pytest.raises(BackendUnavailableError, match="backend 'triton' cannot run on this cpu tensor"):
        quantize_dequantize(torch.zeros(4, 64), "hif4", backend="triton")


def test_triton_has_no_int_kernel():
    with pytest.raises(BackendUnavailableError, match="backend 'triton' has no kernel for format 'int4' .it has: "
                                                      "hif4, mxfp4, nvfp4."):
        quantize_dequantize(torch.zeros(4, 64, device=DEVICE), "int4", backend="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 100, 32760])
@pytest.mark.parametrize("k,n", [(5120, 5120), (5120, 13824), (13824, 5120)])
def test_real_shapes_on_gpu(m, k, n):
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    assert_bitexact(quantize_dequantize(x, "hif4", backend="triton"),
                    quantize_dequantize(x, "hif4", backend="reference"), "quantize")
    out = triton_hif4.hif4_linear(x, triton_hif4.pack_blocks(weight, dim=1), None, n).float()
    x_q = quantize_dequantize(x, "hif4").float()
    w_q = quantize_dequantize(weight, "hif4").float()
    reference = F.linear(x_q, w_q)
    bound = (x_q.abs() @ w_q.abs().T) * k * 2.0**-23 + reference.abs() * 2.0**-8 + 1e-6  # + bf16 output rounding
    assert ((out - reference).abs() <= bound).all(), LINEAR_TOLERANCE


def test_quant_linear_uses_the_fused_kernel_with_backend_triton():
    from sensq.quant import QuantLinear
    from sensq.quant.layers import clip_rows

    torch.manual_seed(0)
    linear = torch.nn.Linear(130, 40).to(DEVICE)
    x = torch.randn(3, 7, 130, device=DEVICE)
    fused = QuantLinear.from_linear(linear, "hif4", "hif4", backend="triton", weight_clip=0.9, act_clip=0.95)
    simulated = QuantLinear.from_linear(linear, "hif4", "hif4", backend="reference", weight_clip=0.9, act_clip=0.95)
    assert fused.fused and not simulated.fused
    got, expected = fused(x).detach(), simulated(x).detach()
    x_q = quantize_dequantize(clip_rows(x, 0.95), "hif4")
    bound = (x_q.abs().reshape(-1, 130) @ simulated.weight_q.abs().T).reshape(got.shape) * 130 * 2.0**-23 + 1e-5
    assert ((got - expected).abs() <= bound).all(), LINEAR_TOLERANCE


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["hif4", "mxfp4", "nvfp4", "nvfp4_ts"])
def test_pack_on_gpu_writes_the_bytes_of_the_reference(fmt):
    """On CUDA tensors ``pack`` takes the registered kernels ("pack" for HiF4, "encode" for the E2M1 formats)."""
    weight = awkward_tensor((300, 448), seed=5)
    on_gpu, on_cpu = pack(weight.to("cuda"), fmt), pack(weight, fmt)
    assert on_gpu.data.keys() == on_cpu.data.keys()
    for key in on_cpu.data:
        assert torch.equal(on_gpu.data[key].cpu(), on_cpu.data[key]), key
