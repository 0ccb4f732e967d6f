"""Number formats as data: a frozen :class:`FormatSpec` per format, and the registry that names them.

A format quantizes a tensor in *blocks* that run contiguously along one dimension (the
contraction dimension of a Linear: ``in_features`` for weights ``[out, in]`` and activations
``[..., in]``). Every block shares scale metadata; every element stores a small code.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable
from dataclasses import dataclass

from sensq.errors import FormatError

FP32_MAX = 3.4028234663852886e38
FP32_MIN_SUBNORMAL = 2.0**-149
BF16_MAX = 3.3895313892515355e38
BF16_MIN_SUBNORMAL = 2.0**-133

HIF4_BLOCK = 64
HIF4_SCALE_MIN = 2.0**-48  # spec §3 step 3
HIF4_SCALE_MAX = 49152.0  # 1.5 * 2**15, spec §3 step 3
HIF4_MAX = 7.0 * HIF4_SCALE_MAX  # 344064, spec §4
HIF4_MIN_NONZERO = 0.25 * HIF4_SCALE_MIN  # 2**-50, spec §4

MX_BLOCK = 32
E2M1_MAX = 6.0
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # magnitudes of the 3-bit code

NVFP4_BLOCK = 16
E4M3_MAX = 448.0
E4M3_MIN_SUBNORMAL = 2.0**-9


class Family(enum.Enum):
    """How a format's codes and scales are laid out; selects the codec."""

    HIF4 = "hif4"
    """HiFloat4: 64-blocks, E6M2 scale per 64, 1-bit exponent per 8 and per 4, S1P2 elements."""
    MXFP4 = "mxfp4"
    """E2M1 elements, E8M0 power-of-two scale per 32."""
    NVFP4 = "nvfp4"
    """E2M1 elements, E4M3 scale per 16 (optionally times a per-tensor FP32 scale)."""
    INT = "int"
    """Symmetric integers, FP32 scale = absmax / qmax per group."""
    FP8 = "fp8"
    """FP8 E4M3 elements, FP32 scale = absmax / 448 per group."""
    BF16 = "bf16"
    """Round to bfloat16 (the identity on bf16 tensors); no blocks."""
    MXFP8 = "mxfp8"
    """E4M3 elements, E8M0 power-of-two scale per 32 (OCP MX v1.0)."""
    KQUANT = "kquant"
    """llama.cpp's K-quants (GGUF): unsigned codes, sub-block scales (and mins) under FP16 super-block scales."""


class ScaleType(enum.Enum):
    """What the per-block metadata is."""

    E6M2_3LEVEL = "E6M2+1b/8+1b/4"
    E8M0 = "E8M0"
    E4M3 = "E4M3"
    E4M3_X_FP32 = "E4M3 x FP32"
    FP32 = "FP32"
    KQUANT = "6b scale+min/32, FP16 d+dmin/256"
    KQUANT_SIGNED = "int8 scale/16, FP16 d/256"
    NONE = "none"


class MXVariant(enum.Enum):
    """Which MXFP4 rounding the ``mxfp4`` family follows."""

    HIFLOAT4_REPO = "hifloat4"
    """The HiFloat4 repo's python reference (spec §7): +9.6e-7 bias in log2, elements half-up."""
    OCP = "ocp"
    """OCP MX v1.0: scale 2^(floor(log2 amax) - 2), elements round-half-even, saturating."""


@dataclass(frozen=True)
class FormatSpec:
    """A quantization format: what is stored per element and per block, and its value range.

    Attributes:
        name: registry name (``get_format(name)``).
        family: the codec family.
        element: the element encoding, for people (``"E2M1"``, ``"INT4"``).
        element_bits: bits stored per element.
        block_size: elements per block along the grouped dim; ``None`` = the whole dim
            (per output channel for weights, per token for activations).
        scale: the kind of per-block metadata.
        scale_bits: metadata bits per block.
        tensor_scale_bits: metadata bits per tensor (NVFP4 with a per-tensor scale).
        max_value: largest finite output magnitude.
        min_nonzero: smallest nonzero output magnitude.
        n_values: distinct finite values one element can take inside one block (``-0`` not counted).
        qmax: largest integer code for INT formats, else 0.
        mx_variant: rounding variant for the MXFP4 family.
        summary: one line for tables.
    """

    name: str
    family: Family
    element: str
    element_bits: int
    block_size: int | None
    scale: ScaleType
    scale_bits: int
    max_value: float
    min_nonzero: float
    n_values: int
    summary: str
    tensor_scale_bits: int = 0
    qmax: int = 0
    mx_variant: MXVariant | None = None

    @property
    def identity(self) -> str:
        """The name that selects exactly this format: the registry name, plus ``@<group size>`` (or
        ``@channel``) when the group size is not the registry's (``int4@16``, ``fp8_e4m3@128``).
        ``get_format(spec.identity) == spec``; rules, rankings, checkpoints and exports record it."""
        default = _REGISTRY[self.name].block_size if self.name in _REGISTRY else self.block_size
        if self.block_size == default:
            return self.name
        return f"{self.name}@{'channel' if self.block_size is None else self.block_size}"

    @property
    def has_groupsize_option(self) -> bool:
        return self.family in (Family.INT, Family.FP8)

    def bits_per_element(self, dim_length: int | None = None) -> float:
        """Storage bits per element including block metadata.

        Args:
            dim_length: length of the grouped dim; needed only when ``block_size`` is ``None``.

        Raises:
            FormatError: a per-channel format without ``dim_length``.
        """
        block = self.block_size if self.block_size is not None else dim_length
        if self.scale_bits == 0:
            return float(self.element_bits)
        if block is None:
            raise FormatError(
                f"format {self.name!r} has one scale per whole dim: pass dim_length to bits_per_element"
            )
        return self.element_bits + self.scale_bits / block

    def to_dict(self) -> dict:
        """JSON-ready description (enums by value)."""
        out = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            out[field.name] = value.value if isinstance(value, enum.Enum) else value
        return out


def _int_spec(bits: int, group_size: int | None) -> FormatSpec:
    qmax = 2 ** (bits - 1) - 1
    where = "per channel" if group_size is None else f"per {group_size}"
    return FormatSpec(
        name=f"int{bits}",
        family=Family.INT,
        element=f"INT{bits}",
        element_bits=bits,
        block_size=group_size,
        scale=ScaleType.FP32,
        scale_bits=32,
        max_value=FP32_MAX,
        min_nonzero=FP32_MIN_SUBNORMAL,
        n_values=2 * qmax + 1,
        qmax=qmax,
        summary=f"symmetric INT{bits} in [-{qmax}, {qmax}], FP32 scale absmax/{qmax} {where}",
    )


_REGISTRY: dict[str, FormatSpec] = {
    spec.name: spec
    for spec in (
        FormatSpec(
            name="hif4",
            family=Family.HIF4,
            element="S1P2",
            element_bits=4,
            block_size=HIF4_BLOCK,
            scale=ScaleType.E6M2_3LEVEL,
            scale_bits=8 + 8 + 16,
            max_value=HIF4_MAX,
            min_nonzero=HIF4_MIN_NONZERO,
            n_values=31,
            summary="HiFloat4 (hifx4), bit-exact to the official python reference",
        ),
        FormatSpec(
            name="mxfp4",
            family=Family.MXFP4,
            element="E2M1",
            element_bits=4,
            block_size=MX_BLOCK,
            scale=ScaleType.E8M0,
            scale_bits=8,
            max_value=E2M1_MAX * 2.0**125,
            min_nonzero=0.5 * 2.0**-22,
            n_values=15,
            mx_variant=MXVariant.HIFLOAT4_REPO,
            summary="MXFP4 as the HiFloat4 repo computes it (log2 bias, half-up ties)",
        ),
        FormatSpec(
            name="mxfp4_ocp",
            family=Family.MXFP4,
            element="E2M1",
            element_bits=4,
            block_size=MX_BLOCK,
            scale=ScaleType.E8M0,
            scale_bits=8,
            max_value=E2M1_MAX * 2.0**125,  # finite float32 inputs never need a larger scale
            min_nonzero=0.5 * 2.0**-127,
            n_values=15,
            mx_variant=MXVariant.OCP,
            summary="MXFP4 per OCP MX v1.0 (floor(log2 amax)-2, ties to even)",
        ),
        FormatSpec(
            name="nvfp4",
            family=Family.NVFP4,
            element="E2M1",
            element_bits=4,
            block_size=NVFP4_BLOCK,
            scale=ScaleType.E4M3,
            scale_bits=8,
            max_value=E2M1_MAX * E4M3_MAX,
            min_nonzero=0.5 * E4M3_MIN_SUBNORMAL,
            n_values=15,
            summary="NVFP4 as the HiFloat4 repo computes it (no per-tensor scale)",
        ),
        FormatSpec(
            name="nvfp4_ts",
            family=Family.NVFP4,
            element="E2M1",
            element_bits=4,
            block_size=NVFP4_BLOCK,
            scale=ScaleType.E4M3_X_FP32,
            scale_bits=8,
            tensor_scale_bits=32,
            max_value=FP32_MAX,
            min_nonzero=FP32_MIN_SUBNORMAL,
            n_values=15,
            summary="NVFP4 with the standard per-tensor FP32 scale amax/(448*6)",
        ),
        _int_spec(4, 128),
        _int_spec(8, None),
        FormatSpec(
            name="fp8_e4m3",
            family=Family.FP8,
            element="E4M3",
            element_bits=8,
            block_size=None,
            scale=ScaleType.FP32,
            scale_bits=32,
            max_value=FP32_MAX,
            min_nonzero=FP32_MIN_SUBNORMAL,
            n_values=253,
            summary="FP8 E4M3 (fn), FP32 scale absmax/448 per channel / per token",
        ),
        FormatSpec(
            name="bf16",
            family=Family.BF16,
            element="BF16",
            element_bits=16,
            block_size=None,
            scale=ScaleType.NONE,
            scale_bits=0,
            max_value=BF16_MAX,
            min_nonzero=BF16_MIN_SUBNORMAL,
            n_values=65279,
            summary="bfloat16 round-to-nearest-even; the identity on bf16 tensors",
        ),
    )
}

_UNSET = object()


@dataclass(frozen=True)
class Codec:
    """How a format turns float32 blocks ``[rows, n_blocks, block]`` into codes and per-block metadata and back
    (:class:`sensq.formats.reference.Encoded`): the reference every backend is tested against. Codes of 4-bit
    formats are stored two per byte, others one per byte (or two for 16-bit); the metadata as it is."""

    encode: Callable
    decode: Callable
    kernels: bool = False
    """True when the format family's fast kernels (numba, triton) compute exactly this codec (the built-in
    formats, tested bit-exact); a registered format runs on the reference codec unless it says so."""


_CODECS: dict[str, Codec] = {}


def register_format(spec: FormatSpec, codec: Codec) -> FormatSpec:
    """Add a number format: ``get_format(spec.name)`` finds it, the reference quantizes and packs with its codec,
    plans, calibration, checkpoints and rankings take it by name. A new format is one module calling this
    (the built-in ones are registered by :mod:`sensq.formats.reference`).

    Raises:
        FormatError: the name is taken by another format.
    """
    if spec.name in _REGISTRY and _REGISTRY[spec.name] != spec:
        raise FormatError(f"format {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    _CODECS[spec.name] = codec
    return spec


def unregister_format(name: str) -> None:
    """Remove a format added by :func:`register_format` (tests)."""
    _REGISTRY.pop(name, None)
    _CODECS.pop(name, None)


def codec_of(spec: FormatSpec) -> Codec:
    """The registered codec of ``spec`` (by name: a group-size variant shares its base format's codec)."""
    try:
        return _CODECS[spec.name]
    except KeyError:
        raise FormatError(f"format {spec.name!r} has no registered codec") from None


def format_names() -> list[str]:
    """Names ``get_format`` accepts, in table order."""
    return list(_REGISTRY)


def get_format(name: str | FormatSpec, *, group_size: int | None | object = _UNSET) -> FormatSpec:
    """Look up a format by name.

    Args:
        name: a registry name (see :func:`format_names`), optionally with a group size as
            ``FormatSpec.identity`` writes it (``int4@16``, ``int8@64``, ``fp8_e4m3@channel``), or a
            ``FormatSpec`` (returned as is, or with the group size replaced).
        group_size: for ``int4``, ``int8`` and ``fp8_e4m3`` only: elements per scale along the
            grouped dim, or ``None`` for one scale per whole dim (per channel / per token).

    Raises:
        FormatError: unknown name, or a group size the format does not have.
    """
    if isinstance(name, str) and "@" in name:
        base, _, size = name.partition("@")
        if size == "channel":
            group: int | None = None
        elif size.isdigit() and int(size) > 0:
            group = int(size)
        else:
            raise FormatError(f"format {name!r}: the group size after '@' is a positive number or 'channel' "
                              "(int4@16, fp8_e4m3@channel)")
        if group_size is not _UNSET and group_size != group:
            raise FormatError(f"format {name!r} names group size {size}; got group_size={group_size!r} too")
        return get_format(base, group_size=group)
    if isinstance(name, FormatSpec):
        spec = name
    else:
        try:
            spec = _REGISTRY[name]
        except (KeyError, TypeError):
            raise FormatError(
                f"unknown format {name!r}; known formats: {', '.join(_REGISTRY)}"
            ) from None
    if group_size is _UNSET or group_size == spec.block_size:
        return spec
    if not spec.has_groupsize_option:
        raise FormatError(
            f"format {spec.name!r} has a fixed block size of {spec.block_size}; got group_size={group_size!r}"
        )
    if group_size is not None and (not isinstance(group_size, int) or group_size < 1):
        raise FormatError(
            f"group_size must be a positive int or None (per channel); got {group_size!r}"
        )
    if spec.family is Family.INT:
        return _int_spec(spec.element_bits, group_size)
    where = "per channel / per token" if group_size is None else f"per {group_size}"
    return dataclasses.replace(
        spec, block_size=group_size, summary=f"FP8 E4M3 (fn), FP32 scale absmax/448 {where}"
    )
