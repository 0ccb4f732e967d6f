"""The ``triton`` backend: fused HiF4 quantize(-dequantize) along the last dim, one program per
``BLOCK_G`` 64-blocks.

Must match ``sensq.formats.reference._hif4_encode`` / ``_hif4_decode`` bit for bit (HiF4 spec §3);
tested against it under ``TRITON_INTERPRET=1`` on CPU (small shapes, default test run) and on a GPU
(real shapes, marked ``gpu``). Interpreter-safe by construction (shared/notes/triton-cpu.md): inputs
are upcast to float32 right after loading, every bfloat16 / E6M2 rounding is done on integer bits
(the interpreter's float->bf16 cast truncates), no libdevice, no bf16 arithmetic. The mantissa step
is fused exactly as in the ``cpu`` backend (kernels/numba_hif4.py explains why it is the same float).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sensq.formats.spec import FormatSpec

BLOCK_G = 64  # 64-blocks per program: big enough to keep the interpreter's per-program overhead low


@triton.jit
def _pow2(exponent):
    """2**exponent as float32 (normal exponents), from its bits."""
    return ((exponent + 127) << 23).to(tl.uint32).to(tl.float32, bitcast=True)


@triton.jit
def _hif4_tile(x, BLOCK: tl.constexpr):
    """HiF4 fields of a float32 tile ``[BLOCK, 64]``, one 64-block per row (spec §3 steps 1-9)."""
    a = tl.abs(x)
    has_nan = tl.sum((x != x).to(tl.int32), axis=1) > 0  # tl.max need not propagate NaN: test explicitly
    max4 = tl.max(tl.reshape(a, (BLOCK, 16, 4)), axis=2)  # [BLOCK, 16]
    max8 = tl.max(tl.reshape(max4, (BLOCK, 8, 2)), axis=2)  # [BLOCK, 8]
    block_max = tl.max(max8, axis=1)  # [BLOCK]
    # steps 2-3: s = bf16_RNE(fp32(M * INV7)) clipped to [2^-48, 49152]
    bits = (block_max * 0.142578125).to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    s = tl.minimum(tl.maximum(bits.to(tl.float32, bitcast=True), 3.552713678800501e-15), 49152.0)
    # step 5: E6M2 = round-half-even of the 7-bit bf16 mantissa to 2 bits
    bits = s.to(tl.uint32, bitcast=True)
    exponent = ((bits >> 23) & 0xFF).to(tl.int32) - 127
    mantissa7 = ((bits >> 16) & 0x7F).to(tl.int32)
    m = mantissa7 >> 5
    rest = mantissa7 & 31
    m = m + ((rest > 16) | ((rest == 16) & ((m & 1) == 1))).to(tl.int32)
    carry = m == 4
    exponent = tl.where(carry, exponent + 1, exponent)
    m = tl.where(carry, 0, m)
    sf = (1.0 + m.to(tl.float32) * 0.25) * _pow2(exponent)
    # step 6: rec = bf16_RNE(1/sf) = 2^-E * {1, 0.80078125, 0.66796875, 0.5703125}[m]
    rec_m = tl.where(m == 0, 1.0, tl.where(m == 1, 0.80078125, tl.where(m == 2, 0.66796875, 0.5703125)))
    rec = rec_m * _pow2(-exponent)
    # steps 7-8: lv2 per 8-block, lv3 per 4-block (x / L == x * (1/L) exactly for L in {1, 2})
    lv2 = tl.where(max8 * rec[:, None] >= 4.0, 2.0, 1.0)  # [BLOCK, 8]
    lv2_per4 = tl.reshape(tl.broadcast_to(lv2[:, :, None], (BLOCK, 8, 2)), (BLOCK, 16))
    lv3 = tl.where((max4 * rec[:, None]) * (1.0 / lv2_per4) >= 2.0, 2.0, 1.0)  # [BLOCK, 16]
    # step 9 fused: q4 = min(floor(|x| * 4 rec / (L2 L3) + 0.5), 7)
    factor = 4.0 * rec[:, None] * (1.0 / lv2_per4) * (1.0 / lv3)
    factor = tl.reshape(tl.broadcast_to(factor[:, :, None], (BLOCK, 16, 4)), (BLOCK, 64))
    q4 = tl.minimum(tl.floor(a * factor + 0.5), 7.0)
    return q4, lv2, lv2_per4, lv3, sf, m, exponent, has_nan


@triton.jit
def _hif4_dequantized_tile(x, BLOCK: tl.constexpr):
    """Quantize-dequantize a float32 tile ``[BLOCK, 64]`` (one 64-block per row)."""
    q4, lv2, lv2_per4, lv3, sf, m, exponent, has_nan = _hif4_tile(x, BLOCK)
    scale = 0.25 * lv2_per4 * lv3 * sf[:, None]  # [BLOCK, 16]
    scale = tl.reshape(tl.broadcast_to(scale[:, :, None], (BLOCK, 16, 4)), (BLOCK, 64))
    magnitude = q4 * scale
    y = tl.where(x < 0, -magnitude, magnitude)
    return tl.where(has_nan[:, None], float("nan"), y)


@triton.jit
def _load_blocks(x_ptr, rows, length, blocks_per_row, BLOCK: tl.constexpr):
    """Load ``BLOCK`` 64-blocks of a ``[rows, length]`` tensor as float32 (zero-padded tails)."""
    group = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    row = group // blocks_per_row
    cols = ((group % blocks_per_row) * 64)[:, None] + tl.arange(0, 64)[None, :]
    mask = (group < rows * blocks_per_row)[:, None] & (cols < length)
    x = tl.load(x_ptr + row[:, None].to(tl.int64) * length + cols, mask=mask, other=0.0).to(tl.float32)
    return x, group, row, cols, mask


@triton.jit
def _hif4_qdq_kernel(x_ptr, out_ptr, rows, length, blocks_per_row, BLOCK: tl.constexpr):
    x, group, row, cols, mask = _load_blocks(x_ptr, rows, length, blocks_per_row, BLOCK)
    y = _hif4_dequantized_tile(x, BLOCK)
    tl.store(out_ptr + row[:, None].to(tl.int64) * length + cols, y, mask=mask)


@triton.jit
def _hif4_pack_kernel(x_ptr, blocks_ptr, rows, length, blocks_per_row, BLOCK: tl.constexpr):
    """Spec §6 layout, 36 bytes per 64-block: scale code | lv2 bits | lv3 bits (u16, little endian) | 32 code
    bytes (element k in byte k // 2, low nibble = even k)."""
    x, group, row, cols, mask = _load_blocks(x_ptr, rows, length, blocks_per_row, BLOCK)
    q4, lv2, lv2_per4, lv3, sf, m, exponent, has_nan = _hif4_tile(x, BLOCK)
    valid = group < rows * blocks_per_row
    scale_code = tl.where(has_nan, 0xFF, (exponent + 48) * 4 + m)
    lv2_bits = tl.where(has_nan, 0, tl.sum(tl.where(lv2 == 2.0, 1, 0) * (1 << tl.arange(0, 8))[None, :], axis=1))
    lv3_bits = tl.where(has_nan, 0, tl.sum(tl.where(lv3 == 2.0, 1, 0) * (1 << tl.arange(0, 16))[None, :], axis=1))
    base = blocks_ptr + group.to(tl.int64) * 36
    tl.store(base, scale_code.to(tl.uint8), mask=valid)
    tl.store(base + 1, lv2_bits.to(tl.uint8), mask=valid)
    tl.store(base + 2, (lv3_bits & 0xFF).to(tl.uint8), mask=valid)
    tl.store(base + 3, (lv3_bits >> 8).to(tl.uint8), mask=valid)
    # nibble = sign << 3 | q4 (sign from x < 0: -0.0 and NaN give 0); 0 in NaN blocks and the padding
    nibble = tl.where(x < 0, 8, 0) + q4.to(tl.int32)
    nibble = tl.where(has_nan[:, None] | (cols >= length), 0, nibble)
    low, high = tl.split(tl.reshape(nibble, (BLOCK, 32, 2)))
    byte = (low | (high << 4)).to(tl.uint8)
    tl.store(base[:, None] + 4 + tl.arange(0, 32)[None, :], byte, mask=valid[:, None])


@triton.jit
def _hif4_linear_kernel(x_ptr, blocks_ptr, bias_ptr, out_ptr, M, N, K, KB,
                        HAS_BIAS: tl.constexpr, DOT_BF16: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr):
    """out[M, N] = Q(x)[M, K] @ W[N, K]^T + bias: activations HiF4-quantized on the fly per token (one
    64-block per K step), weights decoded from their 36-byte packed blocks (spec §6), fp32 accumulation.

    Every decoded operand is exactly a bf16 value (<= 6 significant bits), so a bf16 dot with fp32
    accumulation computes exact products; only the accumulation order differs from F.linear.
    """
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    k_local = tl.arange(0, 64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, KB):
        k = kb * 64 + k_local
        x = tl.load(x_ptr + rm[:, None].to(tl.int64) * K + k[None, :], mask=(rm[:, None] < M) & (k[None, :] < K),
                    other=0.0).to(tl.float32)
        x_q = _hif4_dequantized_tile(x, BLOCK_M)
        base = blocks_ptr + (rn.to(tl.int64) * KB + kb) * 36
        valid = rn < N
        code = tl.load(base, mask=valid, other=0).to(tl.int32)
        lv2 = tl.load(base + 1, mask=valid, other=0).to(tl.int32)
        lv3 = tl.load(base + 2, mask=valid, other=0).to(tl.int32)
        lv3 = lv3 | (tl.load(base + 3, mask=valid, other=0).to(tl.int32) << 8)
        packed = tl.load(base[:, None] + 4 + tl.arange(0, 32)[None, :], mask=valid[:, None], other=0).to(tl.int32)
        nibble = tl.reshape(tl.join(packed & 0xF, packed >> 4), (BLOCK_N, 64))
        sf = (1.0 + (code & 3).to(tl.float32) * 0.25) * _pow2((code >> 2) - 48)
        sf = tl.where(code == 0xFF, float("nan"), sf)
        shift = ((lv2[:, None] >> (k_local // 8)[None, :]) & 1) + ((lv3[:, None] >> (k_local // 4)[None, :]) & 1)
        magnitude = (nibble & 7).to(tl.float32) * 0.25 * (1 << shift).to(tl.float32) * sf[:, None]
        w = tl.where((nibble & 8) != 0, -magnitude, magnitude)
        if DOT_BF16:
            acc += tl.dot(x_q.to(tl.bfloat16), tl.trans(w.to(tl.bfloat16)))
        else:
            acc += tl.dot(x_q, tl.trans(w), input_precision="ieee")
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + rm[:, None].to(tl.int64) * N + rn[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


def hif4_linear(x: torch.Tensor, blocks: torch.Tensor, bias: torch.Tensor | None, out_features: int, *,
                block_m: int = 64, block_n: int = 64) -> torch.Tensor:
    """``F.linear(Q_hif4(x), W, bias)`` with ``W`` ``[N, K]`` given as its packed blocks: uint8
    ``[N, ceil(K/64), 36]`` (``pack_blocks``, or ``sensq.formats.pack(W, "hif4").data["blocks"]``: the same
    bytes). The output has ``x``'s dtype (bf16 out for bf16 in), accumulation in fp32.
    """
    import os

    lead, in_features = x.shape[:-1], x.shape[-1]
    rows = x.detach().reshape(-1, in_features).contiguous()
    n_rows = rows.shape[0]
    n_blocks = -(-in_features // 64)
    if tuple(blocks.shape) != (out_features, n_blocks, 36) or blocks.dtype != torch.uint8:
        raise ValueError(f"packed HiF4 weight must be uint8 [{out_features}, {n_blocks}, 36]; got "
                         f"{blocks.dtype} {list(blocks.shape)}")
    out = torch.empty((n_rows, out_features), dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(n_rows, block_m), triton.cdiv(out_features, block_n))
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    _hif4_linear_kernel[grid](
        rows, blocks.contiguous(), bias if bias is not None else rows, out, n_rows, out_features, in_features,
        n_blocks, HAS_BIAS=bias is not None, DOT_BF16=not interpreted, BLOCK_M=block_m, BLOCK_N=block_n,
    )
    return out.reshape(*lead, out_features)


def _rows(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Size]:
    moved = x.detach().movedim(dim, -1)
    return moved.reshape(-1, moved.shape[-1]).contiguous(), moved.shape


def quantize_dequantize(x: torch.Tensor, spec: FormatSpec, dim: int) -> torch.Tensor:
    """HiF4 quantize-dequantize along ``dim`` (validated, non-empty) on the tensor's device."""
    rows, moved_shape = _rows(x, dim)
    n_rows, length = rows.shape
    blocks_per_row = -(-length // 64)
    out = torch.empty(rows.shape, dtype=torch.float32, device=rows.device)
    grid = (triton.cdiv(n_rows * blocks_per_row, BLOCK_G),)
    _hif4_qdq_kernel[grid](rows, out, n_rows, length, blocks_per_row, BLOCK=BLOCK_G)
    return out.reshape(moved_shape).movedim(-1, dim).to(x.dtype).contiguous()


def pack_blocks(x: torch.Tensor, dim: int) -> torch.Tensor:
    """HiF4 of ``x`` along ``dim`` in the spec §6 layout: uint8 ``[rows, ceil(length/64), 36]``, the same bytes
    as ``sensq.formats.pack(x, "hif4").data["blocks"]`` (tested), computed on the tensor's device."""
    rows, _ = _rows(x, dim)
    n_rows, length = rows.shape
    blocks_per_row = -(-length // 64)
    blocks = torch.empty((n_rows * blocks_per_row, 36), dtype=torch.uint8, device=rows.device)
    grid = (triton.cdiv(n_rows * blocks_per_row, BLOCK_G),)
    _hif4_pack_kernel[grid](rows, blocks, n_rows, length, blocks_per_row, BLOCK=BLOCK_G)
    return blocks.reshape(n_rows, blocks_per_row, 36)
