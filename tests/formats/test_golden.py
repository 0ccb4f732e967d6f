"""Every golden pair (official HiFloat4 references, golden README) bit-exact, on every backend."""

import pytest
from conftest import golden_cases, load_golden

from sensq.formats import quantize_dequantize
from sensq.formats.backend import Backend, families
from sensq.formats.spec import get_format
from sensq.testing import assert_bitexact

CASES = golden_cases()


def test_golden_file_has_every_family():
    formats = {load_golden(name)[2]["format"] for name in CASES}
    assert formats == {"hif4", "mxfp4", "nvfp4"}
    assert len(CASES) >= 98


@pytest.mark.parametrize("name", CASES)
def test_reference_matches_golden(name):
    x, expected, meta = load_golden(name)
    got = quantize_dequantize(x, meta["format"], dim=meta["axis"], backend="reference")
    assert_bitexact(got, expected, name)


CPU_CASES = [n for n in CASES if get_format(load_golden(n)[2]["format"]).family in families(Backend.CPU)]


@pytest.mark.parametrize("name", CPU_CASES)
def test_cpu_backend_matches_golden(name):
    pytest.importorskip("numba")
    x, expected, meta = load_golden(name)
    got = quantize_dequantize(x, meta["format"], dim=meta["axis"], backend="cpu")
    assert_bitexact(got, expected, name)
