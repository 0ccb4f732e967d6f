"""Packed storage: a tensor in its format's real bit layout, and back.

HiF4 uses the layout of spec §6: 36 bytes per 64-block, ``scale:u8 | lv2:u8 | lv3:u16 (little
endian) | 32 code bytes`` (element k in byte k//2, low nibble = even k, nibble = ``sign<<3 | m``).
The other 4-bit formats store two codes per byte (same nibble order) and their scales in a
separate tensor; INT8/FP8 store a byte per element; BF16 stores its two bytes.

``unpack(pack(x, fmt)) == quantize_dequantize(x, fmt)`` bit for bit (tested).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

import sensq
from sensq.errors import InputError
from sensq.formats import reference
from sensq.formats.backend import Backend, find_kernel
from sensq.formats.blocks import BlockLayout, check_input, from_blocks, to_blocks
from sensq.formats.spec import Family, FormatSpec, codec_of, get_format

PACKED_SCHEMA = "sensq.packed/1"
HIF4_BLOCK_BYTES = 36

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
           "float64": torch.float64}


@dataclass
class PackedTensor:
    """A tensor stored in a format's bit layout.

    Attributes:
        fmt: the format.
        shape: the original tensor's shape.
        dim: the dim blocks run along (non-negative).
        dtype: the original dtype; :func:`unpack` returns it.
        data: the stored tensors by name (``blocks`` for HiF4; ``codes``, ``scale`` and
            ``tensor_scale`` for the others).
    """

    fmt: FormatSpec
    shape: tuple[int, ...]
    dim: int
    dtype: torch.dtype
    data: dict[str, torch.Tensor]

    @property
    def nbytes(self) -> int:
        """True storage in bytes: codes and metadata, nothing else."""
        return sum(t.numel() * t.element_size() for t in self.data.values())

    @property
    def layout(self) -> BlockLayout:
        block = self.fmt.block_size if self.fmt.block_size is not None else self.shape[self.dim]
        return BlockLayout(self.shape, self.dim, self.shape[self.dim], block)

    def header(self) -> dict:
        """What, besides ``data``, is needed to unpack: JSON-ready."""
        return {
            "schema": PACKED_SCHEMA,
            "format": self.fmt.name,
            "block_size": self.fmt.block_size,
            "shape": list(self.shape),
            "dim": self.dim,
            "dtype": str(self.dtype).removeprefix("torch."),
            "sensq_version": sensq.__version__,
        }

    def save(self, path: str | Path) -> None:
        """Write a safetensors file (tensors + the header as metadata), atomically."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        save_file({k: v.contiguous() for k, v in self.data.items()}, str(tmp),
                  metadata={"sensq.packed": json.dumps(self.header())})
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> PackedTensor:
        """Read a file written by :meth:`save`.

        Raises:
            InputError: missing file, or not a sensq packed tensor.
        """
        path = Path(path)
        if not path.is_file():
            raise InputError(f"packed tensor file not found: {str(path)!r}")
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            if "sensq.packed" not in meta:
                raise InputError(f"{str(path)!r} is not a sensq packed tensor (no 'sensq.packed' metadata)")
            data = {k: f.get_tensor(k) for k in f.keys()}
        return cls.from_header(json.loads(meta["sensq.packed"]), data)

    @classmethod
    def from_header(cls, header: dict, data: dict[str, torch.Tensor]) -> PackedTensor:
        if header.get("schema") != PACKED_SCHEMA:
            raise InputError(f"unsupported packed schema {header.get('schema')!r}; expected {PACKED_SCHEMA!r}")
        fmt = get_format(header["format"])
        if header["block_size"] != fmt.block_size:
            fmt = get_format(header["format"], group_size=header["block_size"])
        return cls(fmt, tuple(header["shape"]), header["dim"], _DTYPES[header["dtype"]], data)


def stored_bytes(spec: FormatSpec, layout: BlockLayout) -> dict[str, int]:
    """Bytes each code field of a packed tensor holds (:func:`pack_encoded`'s layout): HiF4's 36-byte blocks, 4-bit
    codes two per byte, other codes one byte per element (two for 16-bit). A reader checks a file against it."""
    if spec.family is Family.HIF4:
        return {"blocks": layout.rows * layout.n_blocks * HIF4_BLOCK_BYTES}
    elements = layout.n_blocks * layout.block
    per_row = (elements + 1) // 2 if spec.element_bits == 4 else elements * max(1, spec.element_bits // 8)
    return {"codes": layout.rows * per_row}


def _pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes < 16, ``[rows, n]`` -> ``[rows, ceil(n/2)]``, low nibble = even index."""
    if codes.shape[-1] % 2:
        codes = torch.nn.functional.pad(codes, (0, 1))
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def _unpack_nibbles(packed: torch.Tensor, n: int) -> torch.Tensor:
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).reshape(*packed.shape[:-1], -1)[..., :n]


def pack(x: torch.Tensor, fmt: str | FormatSpec, dim: int = -1) -> PackedTensor:
    """Quantize ``x`` along ``dim`` and store it in the format's bit layout.

    Raises:
        FormatError: unknown format.
        InputError: bad dtype or dim, or an empty tensor (nothing to pack).
    """
    spec = get_format(fmt)
    dim = check_input(x, dim)
    if x.numel() == 0:
        raise InputError(f"cannot pack an empty tensor of shape {tuple(x.shape)}")
    if x.device.type == "cuda":  # a registered GPU kernel writes the same bytes (tested)
        fast = find_kernel(Backend.TRITON, spec.family, "pack", "cuda") if codec_of(spec).kernels else None
        if fast is not None:
            return PackedTensor(spec, tuple(x.shape), dim, x.dtype, {"blocks": fast(x, dim)})
    return pack_encoded(_encode(x, spec, dim), spec, tuple(x.shape), dim, x.dtype)


def pack_encoded(encoded: reference.Encoded, spec: FormatSpec, shape: tuple[int, ...], dim: int,
                 dtype: torch.dtype) -> PackedTensor:
    """Store already-chosen codes and metadata (``[rows, n_blocks, block]``, as :mod:`reference` encodes
    them) in the format's bit layout: what :func:`pack` does after encoding, and what a calibration that
    chooses its own codes (GPTQ) uses to keep exactly its choice."""
    rows, n_blocks, block = encoded.codes.shape
    data: dict[str, torch.Tensor]
    if spec.family is Family.HIF4:
        lv3 = encoded.meta["lv3"]
        header = torch.stack(
            (encoded.meta["scale"].to(torch.uint8), encoded.meta["lv2"].to(torch.uint8),
             (lv3 & 0xFF).to(torch.uint8), (lv3 >> 8).to(torch.uint8)), dim=-1)
        codes = _pack_nibbles(encoded.codes.reshape(-1, block)).reshape(rows, n_blocks, block // 2)
        data = {"blocks": torch.cat((header, codes), dim=-1).contiguous()}
    elif spec.family is Family.BF16:
        data = {"codes": encoded.codes.reshape(rows, -1).contiguous()}
    else:
        codes = encoded.codes.reshape(rows, n_blocks * block)
        if spec.element_bits == 4:
            codes = _pack_nibbles(codes & 0xF)
        data = {"codes": codes.contiguous(), **{k: v.contiguous() for k, v in encoded.meta.items()}}
    return PackedTensor(spec, shape, dim, dtype, data)


def _encode(x: torch.Tensor, spec: FormatSpec, dim: int) -> reference.Encoded:
    """The reference encoding of ``x``'s blocks along ``dim``; on a CUDA GPU a registered kernel's (the same
    codes and scales, tested)."""
    fast = (find_kernel(Backend.TRITON, spec.family, "encode", "cuda")
            if x.device.type == "cuda" and codec_of(spec).kernels else None)
    if fast is None:
        return reference.encode(to_blocks(x, dim, spec.block_size)[0], spec)
    codes, scale, tensor_scale = fast(x, spec, dim)
    meta = {"scale": scale}
    if spec.tensor_scale_bits:
        meta["tensor_scale"] = torch.tensor(tensor_scale, dtype=torch.float32, device=x.device)
    return reference.Encoded(codes, meta)


def element_codes(packed: PackedTensor) -> torch.Tensor:
    """One uint8 code per element, ``[rows, n_blocks * block]`` (the padded tail included), of a format stored
    in a ``codes`` field: 4-bit codes out of their nibbles, INT4's sign-extended (read them ``.view(torch.int8)``).
    What :func:`unpack` decodes, and what an export re-lays out for another runtime."""
    layout = packed.layout
    codes = packed.data["codes"]
    if packed.fmt.element_bits == 4:
        codes = _unpack_nibbles(codes, layout.n_blocks * layout.block)
        if packed.fmt.family is Family.INT:
            codes = ((codes.to(torch.int16) ^ 8) - 8).to(torch.int8).view(torch.uint8)  # sign-extend
    return codes.reshape(layout.rows, -1)


def unpack(packed: PackedTensor) -> torch.Tensor:
    """The dequantized tensor: ``x.dtype`` and ``x.shape`` of the packed original."""
    spec, layout = packed.fmt, packed.layout
    rows, n_blocks, block = layout.rows, layout.n_blocks, layout.block
    if spec.family is Family.HIF4:
        stored = packed.data["blocks"]
        meta = {
            "scale": stored[..., 0],
            "lv2": stored[..., 1].to(torch.int32),
            "lv3": stored[..., 2].to(torch.int32) | (stored[..., 3].to(torch.int32) << 8),
        }
        codes = _unpack_nibbles(stored[..., 4:], block)
        encoded = reference.Encoded(codes, meta)
    elif spec.family is Family.BF16:
        encoded = reference.Encoded(packed.data["codes"].reshape(rows, 1, -1))
    else:
        meta = {k: v for k, v in packed.data.items() if k != "codes"}
        encoded = reference.Encoded(element_codes(packed).reshape(rows, n_blocks, block), meta)
    return from_blocks(reference.decode(encoded, spec), layout, packed.dtype)


def unpack_into(packed: PackedTensor, out: torch.Tensor) -> torch.Tensor:
    """:func:`unpack` written into ``out`` (``packed.dtype``, ``numel`` of the original, contiguous): the
    per-forward decode of a deployed layer, into a reused scratch. HiF4 weights packed along their last
    dim decode with the numba kernel on the CPU (float32 and bfloat16); everything else through
    :func:`unpack`. Bit for bit the same values either way (tested)."""
    layout = packed.layout
    fast = find_kernel(Backend.CPU, packed.fmt.family, "unpack", out.device.type) if codec_of(packed.fmt).kernels \
        else None
    if (fast is not None and packed.dim == len(packed.shape) - 1
            and out.dtype in (torch.float32, torch.bfloat16)):
        fast(packed.data["blocks"].reshape(layout.rows, layout.n_blocks, HIF4_BLOCK_BYTES),
             out.view(layout.rows, layout.length))
        return out.view(packed.shape)
    return out.view(packed.shape).copy_(unpack(packed))
