import json

from click.testing import CliRunner

import sensq
from sensq.cli import main
from sensq.formats import format_names


def test_version():
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"sensq, version {sensq.__version__}"


def test_formats_table():
    result = CliRunner().invoke(main, ["formats"], terminal_width=200)
    assert result.exit_code == 0, result.output
    for name in format_names():
        assert name in result.output
    assert "344064" in result.output.replace(",", "") or "3.44e+05" in result.output


def test_formats_json():
    result = CliRunner().invoke(main, ["formats", "--json"])
    assert result.exit_code == 0
    rows = json.loads(result.output)
    by_name = {row["name"]: row for row in rows}
    assert list(by_name) == format_names()
    hif4 = by_name["hif4"]
    assert hif4["bits_per_element"] == 4.5 and hif4["block_size"] == 64
    assert hif4["max_value"] == 344064.0 and hif4["min_nonzero"] == 2.0**-50 and hif4["n_values"] == 31
    assert by_name["int8"]["block_size"] is None and by_name["int8"]["bits_per_element"] == 8 + 32 / 5120


def test_formats_measure_json():
    result = CliRunner().invoke(main, ["formats", "--json", "--measure"])
    assert result.exit_code == 0
    rows = {row["name"]: row for row in json.loads(result.output)}
    assert rows["bf16"]["sqnr_weight_db"] > 50
    assert 15 < rows["hif4"]["sqnr_activation_db"] < 30
    # the 8-bit formats beat the 4-bit ones on the Gaussian weights
    assert rows["int8"]["sqnr_weight_db"] > rows["hif4"]["sqnr_weight_db"] + 10


def test_unknown_command_is_a_usage_error():
    result = CliRunner().invoke(main, ["nope"])
    assert result.exit_code == 2
