"""Plan exports applied by the real torchao and ModelOpt to the embedded model's expert modules.

Each test asserts which layers the library itself ends up quantizing: exactly the plan's quantized
Linear layers of that expert, nothing that the plan protects, nothing of the other expert.
"""

import copy
import dataclasses
import json
import warnings

import pytest
import torch
from click.testing import CliRunner

from sensq.cli import main
from sensq.errors import InputError
from sensq.models.wan import build_tiny_pipeline
from sensq.plan import Plan, Rule, layer_infos, resolve, summarize
from sensq.plan.exports import build_export, write_export

PROTECTED = ("patch_embedding", "blocks.0.attn1.to_q", "blocks.1.ffn.net.0.proj")


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_pipeline("tiny")


def _plan(pipe, weight, activation, *, extra=()) -> Plan:
    infos = layer_infos({"high": pipe.transformer, "low": pipe.transformer_2})
    rules = [Rule(f"high:{name}", None, None) for name in PROTECTED] + list(extra)
    rules += [Rule("re:high:.*", weight, activation), Rule("re:low:blocks\\.1\\..*", weight, activation),
              Rule("re:low:.*", None, None)]
    table, _ = resolve(rules, infos)
    return Plan(rules, table, summarize(table, infos), model={"id": "tiny"})


def _planned(plan, expert, kind="linear"):
    return {row.layer for row in plan.layers if row.expert == expert and row.weight is not None and row.kind == kind}


def _written(export, tmp_path):
    return write_export(export, tmp_path / "plan.json")


# torchao ----------------------------------------------------------------------------------------------------------

TORCHAO_CPU = [("int8", "int8", "Int8DynamicActivationInt8WeightConfig"),
               ("int8", None, "IntxWeightOnlyConfig"),
               ("int4@16", None, "IntxWeightOnlyConfig"),
               ("fp8_e4m3", None, "Float8WeightOnlyConfig"),
               ("nvfp4_ts", None, "NVFP4WeightOnlyConfig"),
               ("mxfp4_ocp", "mxfp4_ocp", "MXDynamicActivationMXWeightConfig"),
               ("mxfp8", "mxfp8", "MXDynamicActivationMXWeightConfig")]
# their kernels (or quantize_ itself) need CUDA sm89+/sm100: the config and torchao's own routing are asserted
TORCHAO_CUDA = [("fp8_e4m3", "fp8_e4m3", "Float8DynamicActivationFloat8WeightConfig"),
                ("nvfp4_ts", "nvfp4_ts", "NVFP4DynamicActivationNVFP4WeightConfig")]


def _torchao_load(path):
    from torchao.core.config import config_from_dict

    with open(path) as handle:
        return config_from_dict(json.load(handle))


def _torchao_quantized(module) -> set[str]:
    return {name for name, layer in module.named_modules()
            if isinstance(layer, torch.nn.Linear) and type(layer.weight) is not torch.nn.Parameter}


@pytest.mark.parametrize("weight,activation,config_class", TORCHAO_CPU)
def test_torchao_quantize_applies_exactly_the_planned_layers(pipe, tmp_path, weight, activation, config_class):
    pytest.importorskip("torchao", reason="the torchao export is tested against torchao: pip install torchao --no-deps")
    from torchao.quantization import FqnToConfig, quantize_

    plan = _plan(pipe, weight, activation)
    paths = _written(build_export(plan, "torchao"), tmp_path)
    assert set(paths) == {"transformer", "transformer_2"}
    for attr, expert in (("transformer", "high"), ("transformer_2", "low")):
        config = _torchao_load(paths[attr])
        assert isinstance(config, FqnToConfig)
        assert {type(c).__name__ for c in config.fqn_to_config.values()} == {config_class}
        module = copy.deepcopy(getattr(pipe, attr)).to(torch.bfloat16)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_(module, config, filter_fn=None)  # the module users hold: names carry no pipeline prefix
        assert _torchao_quantized(module) == _planned(plan, expert)
        assert expert == "low" or not _torchao_quantized(module) & set(PROTECTED)


@pytest.mark.parametrize("weight,activation,config_class", TORCHAO_CUDA)
def test_torchao_cuda_configs_route_exactly_the_planned_layers(pipe, tmp_path, weight, activation, config_class):
    pytest.importorskip("torchao", reason="the torchao export is tested against torchao: pip install torchao --no-deps")
    from torchao.quantization.quant_api import fqn_matches_fqn_config

    plan = _plan(pipe, weight, activation)
    paths = _written(build_export(plan, "torchao"), tmp_path)
    config = _torchao_load(paths["transformer"])
    assert {type(c).__name__ for c in config.fqn_to_config.values()} == {config_class}
    routed = {name for name, layer in pipe.transformer.named_modules() if fqn_matches_fqn_config(name, config)}
    assert routed == _planned(plan, "high")


def test_torchao_config_options_follow_the_format(pipe, tmp_path):
    pytest.importorskip("torchao", reason="the torchao export is tested against torchao: pip install torchao --no-deps")
    from torchao.quantization.granularity import PerGroup

    config = _torchao_load(_written(build_export(_plan(pipe, "int4@16", None), "torchao"), tmp_path)["transformer"])
    assert {c.granularity for c in config.fqn_to_config.values()} == {PerGroup(16)}  # the group size travels
    assert {str(c.weight_dtype) for c in config.fqn_to_config.values()} == {"torch.int4"}
    config = _torchao_load(_written(build_export(_plan(pipe, "nvfp4", "nvfp4"), "torchao"), tmp_path)["transformer"])
    assert {c.use_dynamic_per_tensor_scale for c in config.fqn_to_config.values()} == {False}  # no tensor scale


def test_hif4_has_no_library_equivalent(pipe):
    pytest.importorskip("torchao", reason="the torchao export is tested against torchao: pip install torchao --no-deps")
    with pytest.raises(InputError, match="nothing to export: torchao takes none .*hif4 W/hif4 A"):
        build_export(_plan(pipe, "hif4", "hif4"), "torchao")
    with pytest.raises(InputError, match="nothing to export: modelopt takes none"):
        build_export(_plan(pipe, "hif4", "hif4"), "modelopt")
    with pytest.raises(InputError, match="int8@64 W/int8@64 A"):  # ModelOpt's dynamic blocks lack FP32 scales
        build_export(_plan(pipe, "int8@64", "int8@64"), "modelopt")
    mixed = _plan(pipe, "hif4", "hif4", extra=[Rule("re:high:blocks\\.1\\.attn1\\..*", "int8", "int8")])
    export = build_export(mixed, "torchao")
    assert export.quantized == {"transformer": [f"blocks.1.attn1.{p}" for p in ("to_q", "to_k", "to_v", "to_out.0")]}
    lines = export.unsupported_lines()
    assert len(lines) == 1 and lines[0].startswith("torchao has no hif4 W/hif4 A: ")
    assert "stay in high precision there" in lines[0]


# ModelOpt ---------------------------------------------------------------------------------------------------------

# ModelOpt's dynamic block quantization of NVFP4/MXFP4 runs only on CUDA: for those the recipe and the set of
# enabled quantizers are asserted, for the others also that the quantized forward differs from full precision
MODELOPT = [("nvfp4_ts", "nvfp4_ts", False), ("mxfp4_ocp", "mxfp4_ocp", False), ("mxfp8", "mxfp8", False),
            ("int8", "int8", True),
            ("fp8_e4m3", "fp8_e4m3", True), ("int4@16", None, True), ("int8@64", "int8", True)]


def _inputs(pipe):
    config = pipe.transformer.config
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, config.in_channels, 3, 8, 8, generator=generator)
    text = torch.randn(1, 6, config.text_dim, generator=generator)
    return {"hidden_states": latents, "timestep": torch.tensor([500.0]), "encoder_hidden_states": text,
            "return_dict": False}


@pytest.mark.parametrize("weight,activation,runs_on_cpu", MODELOPT)
def test_modelopt_recipe_quantizes_exactly_the_planned_layers(pipe, tmp_path, weight, activation, runs_on_cpu):
    pytest.importorskip("modelopt", reason="the ModelOpt export is tested against nvidia-modelopt")
    import modelopt.torch.quantization as mtq
    from modelopt.recipe import load_recipe

    plan = _plan(pipe, weight, activation)
    paths = _written(build_export(plan, "modelopt"), tmp_path)
    assert paths["transformer"].name == "plan.modelopt.transformer.yml"
    inputs = _inputs(pipe)
    for attr, expert in (("transformer", "high"), ("transformer_2", "low")):
        recipe = load_recipe(str(paths[attr]))  # ModelOpt's own loader validates the recipe
        module = copy.deepcopy(getattr(pipe, attr))
        reference = module(**inputs)[0]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mtq.quantize(module, recipe.quantize, lambda m: m(**inputs) if runs_on_cpu else None)
        enabled = {name for name, q in module.named_modules() if name.endswith("_quantizer") and q.is_enabled}
        planned = _planned(plan, expert)
        expected = {f"{n}.weight_quantizer" for n in planned}
        expected |= {f"{n}.input_quantizer" for n in planned} if activation else set()
        assert enabled == expected
        assert not runs_on_cpu or not torch.equal(module(**inputs)[0], reference)  # they do quantize


def test_modelopt_conv_and_group_sizes(pipe, tmp_path):
    """A quantized patch embedding is named as unsupported; a group size reaches ModelOpt's block_sizes."""
    pytest.importorskip("modelopt", reason="the ModelOpt export is tested against nvidia-modelopt")
    from modelopt.recipe import load_recipe

    infos = layer_infos({"high": pipe.transformer})
    rules = [Rule("re:high:.*", "int4@16", None)]
    table, _ = resolve(rules, infos)
    export = build_export(Plan(rules, table, summarize(table, infos)), "modelopt")
    assert export.unsupported == {"equivalent for a quantized conv3d layer": ["high:patch_embedding"]}
    recipe = load_recipe(str(_written(export, tmp_path)["transformer"]))
    weights = [e for e in recipe.quantize.quant_cfg if e.quantizer_name.endswith("weight_quantizer")]
    assert weights and {e.cfg.num_bits for e in weights} == {4}
    assert {e.cfg.block_sizes[-1] for e in weights} == {16}


# CLI --------------------------------------------------------------------------------------------------------------

def test_cli_writes_one_file_per_expert_and_keeps_foreign_files(tmp_path, workspace):
    pytest.importorskip("modelopt", reason="the ModelOpt export is tested against nvidia-modelopt")
    runner = CliRunner()
    args = ["plan", str(workspace / "ranking.json"), "--top-k", "1", "--format", "nvfp4_ts", "--rank-format", "hif4",
            "--export", "modelopt", "--out", str(tmp_path / "p.json")]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "p.modelopt.transformer.yml").is_file() and (tmp_path / "p.modelopt.transformer_2.yml").is_file()
    assert runner.invoke(main, args).exit_code == 0  # its own files are replaced
    (tmp_path / "p.modelopt.transformer.yml").write_text("someone else's recipe\n")
    refused = runner.invoke(main, args)
    assert refused.exit_code == 1 and "is not a modelopt export file sensq wrote" in refused.output
    assert (tmp_path / "p.modelopt.transformer.yml").read_text() == "someone else's recipe\n"
    hif4 = runner.invoke(main, args[:5] + ["hif4"] + args[6:-1] + [str(tmp_path / "q.json")])
    assert hif4.exit_code == 1 and "Error: nothing to export" in hif4.output
    assert not (tmp_path / "q.json").exists()  # refused before anything is written


def test_plans_an_export_cannot_map_are_one_clear_error(pipe):
    plan = _plan(pipe, "int8", "int8")
    old = Plan(plan.rules, [dataclasses.replace(row, kind=None) for row in plan.layers])
    with pytest.raises(InputError, match="does not record layer kinds .*rebuild it with sensq plan"):
        build_export(old, "modelopt")
    other = Plan(plan.rules, [dataclasses.replace(row, expert="mid") for row in plan.layers])
    with pytest.raises(InputError, match=r"\[.mid.\] that a wan2.2-t2v-a14b pipeline lacks \(it has high, low\)"):
        build_export(other, "modelopt")
    with pytest.raises(InputError, match="no resolved layer table"):
        build_export(Plan(plan.rules), "modelopt")
    with pytest.raises(InputError, match="--export must be one of modelopt, torchao, got 'onnx'"):
        build_export(plan, "onnx")


def test_an_export_says_the_plans_calibration_is_not_carried(pipe):
    pytest.importorskip("torchao", reason="the torchao export is tested against torchao: pip install torchao --no-deps")
    plan = _plan(pipe, "int8", "int8", extra=[Rule("re:high:blocks\\.1\\..*", "int8", "int8", calibration="gptq")])
    calibrated = [row for row in plan.layers if row.calibration == "gptq"]
    assert len(calibrated) == 9  # blocks.1 of the high expert, less its protected FFN input projection
    lines = build_export(plan, "torchao").unsupported_lines()
    assert any(line.startswith("the plan calibrates 9 exported layer(s) with gptq; the export carries formats only")
               for line in lines), lines


def test_an_exporter_is_one_registration(pipe, tmp_path):
    """A new library is an Exporter registered in EXPORTERS: build_export and write_export use it."""
    from sensq.plan.exporter import EXPORTERS, Exporter, register_exporter

    toy = register_exporter(Exporter(
        "toy", "txt", translate=lambda weight, activation: f"{weight}/{activation}",
        document=lambda layers, plan, attr: "\n".join(f"{name} {config}" for name, config in layers),
        serialize=lambda document, attr: f"# toy\n{document}\n".encode(),
        recognise=lambda head: head.startswith("# toy")))
    try:
        plan = _plan(pipe, "int8", "int8")
        paths = write_export(build_export(plan, "toy"), tmp_path / "p.json")
        lines = paths["transformer"].read_text().splitlines()
        assert lines[0] == "# toy" and len(lines) - 1 == len(_planned(plan, "high"))
        assert all(line.endswith(" int8/int8") for line in lines[1:])
    finally:
        del EXPORTERS[toy.name]
