"""sensq export: the files ComfyUI and ComfyUI-GGUF read, checked with those tools' own code (comfy-kitchen's
layouts as ComfyUI calls them; gguf's reader and dequantizer), against the weights sensq deployed."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from sensq.cli import main
from sensq.export.wan_names import wan_name
from sensq.quant.checkpoint import load_quantized
from sensq.quant.deployed import is_deployed

MIXED_RULES = [  # int8 per channel for block 0, MXFP8 for block 1's self-attention, BF16 kept for proj_out and the
    # patch embedding, NVFP4 elsewhere
    {"match": "re:(high|low):blocks\\.0\\..*", "weight": "int8", "activation": "int8"},
    {"match": "re:(high|low):blocks\\.1\\.attn1\\..*", "weight": "mxfp8", "activation": "mxfp8"},
    {"match": "re:(high|low):(proj_out|patch_embedding)", "weight": None, "activation": None},
    {"match": "re:(high|low):.*", "weight": "nvfp4_ts", "activation": "nvfp4_ts"},
]
INT4_RULES = [  # Q4_0 for every block layer and the patch embedding, the embedders kept
    {"match": "re:(high|low):(condition_embedder\\..*|proj_out)", "weight": None, "activation": None},
    {"match": "re:(high|low):.*", "weight": "int4@32", "activation": "int4@32"},
]


def _checkpoint(workspace, tmp_path, rules, name, calibrate="none"):
    plan = json.loads((workspace / "plan.json").read_text())
    plan["rules"] = rules
    (tmp_path / f"{name}.json").write_text(json.dumps(plan))
    args = ["apply-plan", str(tmp_path / f"{name}.json"), "--out", str(tmp_path / name)]
    if calibrate != "none":
        args += ["--probe", str(workspace / "probe.h5"), "--calibrate", calibrate]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    return tmp_path / name


def _deployed(checkpoint):
    """{expert: {Wan key prefix: (sensq format, the weight sensq's deployed layer computes with)}}."""
    model = load_quantized(checkpoint)
    out = {}
    for expert in model.family.experts(model.pipe):
        module = model.family.expert_module(model.pipe, expert)
        out[expert] = {wan_name(name): (sub.weight_format.identity, sub.decoded_weight().clone())
                       for name, sub in module.named_modules() if is_deployed(sub)}
    return model, out


def _export(checkpoint, target, out):
    result = CliRunner().invoke(main, ["export", str(checkpoint), "--to", target, "--out", str(out)])
    assert result.exit_code == 0, result.output
    return result


def test_wan_names_are_what_diffusers_converts_back(workspace):
    """diffusers' own Wan -> diffusers converter maps every exported key back to the model's key."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    model = load_quantized(workspace / "ckpt")
    for expert in model.family.experts(model.pipe):
        state = {k: v for k, v in model.family.expert_module(model.pipe, expert).state_dict().items()
                 if "sensq" not in k}
        back = convert_wan_transformer_to_diffusers({wan_name(k): v for k, v in state.items()})
        assert set(back) == set(state)
    assert wan_name("blocks.1.attn1.to_q.weight") == "blocks.1.self_attn.q.weight"
    assert wan_name("blocks.10.norm2.bias") == "blocks.10.norm3.bias"  # blocks.1 never matches blocks.10
    assert wan_name("scale_shift_table") == "head.modulation"
    assert wan_name("blocks.3.scale_shift_table") == "blocks.3.modulation"


def test_comfyui_layers_dequantize_to_sensqs_weights_bit_for_bit(workspace, tmp_path):
    pytest.importorskip("comfy_kitchen", reason="tested with comfy-kitchen: pip install -e '.[deploy]'")
    from comfy_kitchen.tensor import TensorCoreMXFP8Layout, TensorCoreNVFP4Layout, TensorWiseINT8Layout

    checkpoint = _checkpoint(workspace, tmp_path, MIXED_RULES, "mixed")
    model, deployed = _deployed(checkpoint)
    _export(checkpoint, "comfyui", tmp_path / "comfy")
    for expert, layers in deployed.items():
        state = load_file(str(tmp_path / "comfy" / f"{expert}.safetensors"))
        quantized = {key[: -len(".comfy_quant")] for key in state if key.endswith(".comfy_quant")}
        assert quantized == set(layers)  # the plan's quantized layers, no more, no fewer
        assert "head.head.weight" in state and "head.head.comfy_quant" not in state  # kept in high precision
        formats = {}
        for key, (fmt, weight) in layers.items():
            tag = json.loads(bytes(state[f"{key}.comfy_quant"].tolist()).decode())["format"]
            formats[tag] = formats.get(tag, 0) + 1
            if tag == "nvfp4":
                params = TensorCoreNVFP4Layout.Params(scale=state[f"{key}.weight_scale_2"], orig_dtype=torch.float32,
                                                      orig_shape=tuple(weight.shape),
                                                      block_scale=state[f"{key}.weight_scale"])
                theirs = TensorCoreNVFP4Layout.dequantize(state[f"{key}.weight"], params)
                assert fmt == "nvfp4_ts"
            elif tag == "mxfp8":
                params = TensorCoreMXFP8Layout.Params(scale=state[f"{key}.weight_scale"].view(torch.float8_e8m0fnu),
                                                      orig_dtype=torch.float32, orig_shape=tuple(weight.shape))
                theirs = TensorCoreMXFP8Layout.dequantize(state[f"{key}.weight"], params)
                assert fmt == "mxfp8"
            else:
                params = TensorWiseINT8Layout.Params(scale=state[f"{key}.weight_scale"], orig_dtype=torch.float32,
                                                     orig_shape=tuple(weight.shape))
                theirs = TensorWiseINT8Layout.dequantize(state[f"{key}.weight"], params)
                assert (tag, fmt) == ("int8_tensorwise", "int8")
            assert torch.equal(theirs, weight), key
        assert formats["nvfp4"] > 0 and formats["int8_tensorwise"] > 0 and formats["mxfp8"] > 0
        module = model.family.expert_module(model.pipe, expert)
        assert torch.equal(state["head.head.weight"], module.proj_out.weight)  # exactly what sensq ran
    report = json.loads((tmp_path / "comfy" / "export.json").read_text())
    assert all(row["codes_kept"] and row["nmse_vs_sensq"] == 0 for row in report["layers"])


def test_an_nvfp4_block_whose_scale_underflows_is_zero_in_comfyui_as_in_sensq():
    """nvfp4_ts stores scale 0 for a block whose E4M3 scale rounds to zero and deploys zeros (ModelOpt would clamp
    the scale to 2^-9); comfy-kitchen's dequantizer multiplies by the stored scale: the same zeros."""
    pytest.importorskip("comfy_kitchen", reason="tested with comfy-kitchen: pip install -e '.[deploy]'")
    from comfy_kitchen.tensor import TensorCoreNVFP4Layout

    from sensq.export.comfyui import _layer
    from sensq.export.target import Layer
    from sensq.formats import pack, unpack

    weight = torch.randn(16, 64, generator=torch.Generator().manual_seed(5)) * 100.0
    weight[3, 16:32] = 1e-9  # far below the tensor's amax / (448 x 6 x 2^9): its block scale underflows
    packed = pack(weight, "nvfp4_ts")
    ours = unpack(packed)
    assert torch.equal(ours[3, 16:32], torch.zeros(16)) and (ours[3, :16] != 0).any()
    state = _layer(Layer("x", "x", packed, ours, None, (16, 64))).tensors
    params = TensorCoreNVFP4Layout.Params(scale=state["x.weight_scale_2"], orig_dtype=torch.float32,
                                          orig_shape=(16, 64), block_scale=state["x.weight_scale"])
    assert torch.equal(TensorCoreNVFP4Layout.dequantize(state["x.weight"], params), ours)


def test_comfyui_awq_w4a16_holds_sensqs_int4_gptq_codes(workspace, tmp_path):
    pytest.importorskip("comfy_kitchen", reason="tested with comfy-kitchen: pip install -e '.[deploy]'")
    from comfy_kitchen.tensor import TensorCoreAWQW4A16Layout

    rules = [dict(rule) for rule in INT4_RULES]
    rules[0]["match"] = "re:(high|low):(condition_embedder\\..*|proj_out|patch_embedding)"  # a Conv3d: no layout
    checkpoint = _checkpoint(workspace, tmp_path, rules, "int4", calibrate="gptq")
    _, deployed = _deployed(checkpoint)
    _export(checkpoint, "comfyui", tmp_path / "comfy")
    for expert, layers in deployed.items():
        state = load_file(str(tmp_path / "comfy" / f"{expert}.safetensors"))
        for key, (fmt, weight) in layers.items():
            tag = json.loads(bytes(state[f"{key}.comfy_quant"].tolist()).decode())
            assert tag == {"format": "awq_w4a16", "group_size": 32} and fmt == "int4@32"
            params = TensorCoreAWQW4A16Layout.Params(scale=state[f"{key}.weight_scale"], orig_dtype=torch.float32,
                                                     orig_shape=tuple(weight.shape), zeros=state[f"{key}.weight_zeros"],
                                                     group_size=32)
            assert torch.equal(TensorCoreAWQW4A16Layout.dequantize(state[f"{key}.weight"], params), weight), key


def test_nvfp4_block_scales_follow_cublas_swizzle():
    pytest.importorskip("comfy_kitchen", reason="tested with comfy-kitchen: pip install -e '.[deploy]'")
    from comfy_kitchen.float_utils import from_blocked, to_blocked

    from sensq.export.comfyui import swizzle

    scales = torch.arange(200 * 9, dtype=torch.float32).reshape(200, 9)  # pads to 256 x 12
    assert torch.equal(swizzle(scales), to_blocked(scales, flatten=False))
    assert torch.equal(from_blocked(swizzle(scales), 200, 9), scales)


def test_gguf_keeps_sensqs_gptq_codes_and_reports_the_fp16_scale(workspace, tmp_path):
    gguf = pytest.importorskip("gguf", reason="tested with gguf: pip install -e '.[deploy]'")
    import numpy as np

    checkpoint = _checkpoint(workspace, tmp_path, INT4_RULES, "int4", calibrate="gptq")
    _, deployed = _deployed(checkpoint)
    _export(checkpoint, "gguf", tmp_path / "gguf")
    report = {(row["expert"], row["key"]): row for row in
              json.loads((tmp_path / "gguf" / "export.json").read_text())["layers"]}
    for expert, layers in deployed.items():
        reader = gguf.GGUFReader(str(tmp_path / "gguf" / f"{expert}.gguf"))
        assert bytes(reader.get_field("general.architecture").parts[-1]).decode() == "wan"
        tensors = {t.name: t for t in reader.tensors}
        q4 = {name[: -len(".weight")] for name, t in tensors.items()
              if t.tensor_type == gguf.GGMLQuantizationType.Q4_0}
        assert q4 == set(layers)
        for key, (fmt, weight) in layers.items():
            tensor = tensors[f"{key}.weight"]
            theirs = torch.from_numpy(gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32))
            theirs = theirs.reshape(weight.shape[0], -1)
            weight = weight.reshape(weight.shape[0], -1)
            # the codes are sensq's: the ratio of each element to its block's value is sensq's, only the
            # FP16 block scale differs, by at most half an FP16 ulp
            relative = (theirs - weight).abs() / weight.abs().clamp_min(1e-30)
            assert float(relative[weight != 0].max()) <= 2.0**-11, key
            error = float(((theirs.double() - weight.double()) ** 2).sum() / (weight.double() ** 2).sum())
            assert report[(expert, key)]["nmse_vs_sensq"] == pytest.approx(error, rel=1e-6)
            assert fmt == "int4@32"
        kept = tensors["head.head.weight"]
        assert kept.tensor_type == gguf.GGMLQuantizationType.F32
        shape = reader.get_field("comfy.gguf.orig_shape.patch_embedding.weight")
        assert shape is not None and len(shape.data) == 5  # ComfyUI-GGUF reshapes the Conv3d back


K_QUANT_RULES = [  # the tiny model's one 256-wide layer (GGUF's K-quants hold whole super-blocks of 256): Q6_K
    # in the high-noise expert, Q4_K in the low-noise one, the rest kept
    {"match": "high:condition_embedder.time_embedder.linear_1", "weight": "q6_k", "activation": None},
    {"match": "low:condition_embedder.time_embedder.linear_1", "weight": "q4_k", "activation": None},
    {"match": "re:.*", "weight": None, "activation": None},
]


def test_gguf_keeps_gptq_codes_on_the_k_quant_grids(workspace, tmp_path):
    """GPTQ rounds onto Q4_K's and Q6_K's two-level grids (the super-block's scales chosen at its first column
    from the error-compensated values) and the GGUF file holds exactly those codes: gguf's dequantizer gives
    sensq's deployed weight bit for bit, and the codes are not the round-to-nearest ones."""
    gguf = pytest.importorskip("gguf", reason="tested with gguf: pip install -e '.[deploy]'")
    import numpy as np

    from sensq.formats import quantize_dequantize
    from sensq.loading import load_model

    checkpoint = _checkpoint(workspace, tmp_path, K_QUANT_RULES, "kquant", calibrate="gptq")
    _, deployed = _deployed(checkpoint)
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    quantized = [entry for entry in manifest["layers"].values() if entry["weight"]]
    assert len(quantized) == sum(map(len, deployed.values())) == 2
    assert {entry["calibration"] for entry in quantized} == {"gptq"}
    _export(checkpoint, "gguf", tmp_path / "gguf")
    source = load_model("tiny", torch.device("cpu"), torch.float32)
    differs = 0
    for expert, layers in deployed.items():
        assert {fmt for fmt, _ in layers.values()} == {"q6_k" if expert == "high" else "q4_k"}
        tensors = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "gguf" / f"{expert}.gguf")).tensors}
        original = {wan_name(name): module.weight.detach() for name, module in
                    source.family.expert_module(source.pipe, expert).named_modules() if wan_name(name) in layers}
        for key, (fmt, weight) in layers.items():
            tensor = tensors[f"{key}.weight"]
            assert tensor.tensor_type.name == fmt.upper()
            theirs = torch.from_numpy(gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32))
            assert torch.equal(theirs.reshape(weight.shape), weight.float()), key
            differs += not torch.equal(weight.float(), quantize_dequantize(original[key].float(), fmt))
    assert differs > 0  # GPTQ's codes, not round-to-nearest of its own output


@pytest.mark.parametrize("target, fragments", [
    ("gguf", ("GGUF (as ComfyUI-GGUF reads it) has no layout for sensq's hif4", "--format q4_k")),
    ("comfyui", ("ComfyUI has no layout for sensq's hif4", "--format nvfp4_ts")),
])
def test_a_format_without_a_home_is_refused_in_one_line(workspace, tmp_path, target, fragments):
    result = CliRunner().invoke(main, ["export", str(workspace / "ckpt"), "--to", target, "--out",
                                       str(tmp_path / "x")])
    assert result.exit_code == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and all(f in lines[0] for f in fragments), result.stderr
    assert not (tmp_path / "x").exists()


def _swap_nibbles(state, key):
    q = state[f"{key}.weight"]
    state[f"{key}.weight"] = ((q & 0xF) << 4) | (q >> 4)  # the low-nibble-first order ComfyUI does not use


def test_audit_names_formats_flags_crossed_conventions_and_round_trips(workspace, tmp_path):
    pytest.importorskip("comfy_kitchen", reason="tested with comfy-kitchen: pip install -e '.[deploy]'")
    from safetensors.torch import save_file

    checkpoint = _checkpoint(workspace, tmp_path, MIXED_RULES, "mixed")
    _, deployed = _deployed(checkpoint)
    _export(checkpoint, "comfyui", tmp_path / "comfy")
    sound = CliRunner().invoke(main, ["audit", str(tmp_path / "comfy" / "high.safetensors"),
                                      str(tmp_path / "comfy" / "low.safetensors"), "--model", "tiny", "--json",
                                      "--plan-out", str(tmp_path / "theirs.json")])
    assert sound.exit_code == 0, sound.output
    audits = json.loads(sound.stdout)
    for audited in audits:
        formats = {layer["key"]: layer["fmt"] for layer in audited["quantized"]}
        assert set(formats) == set(deployed[audited["expert"]])
        assert {formats[k] for k in formats} == {"nvfp4", "int8_tensorwise", "mxfp8"} and audited["suspect"] == []
        assert all(0.5 < layer["ratio"] < 2 for layer in audited["quantized"])  # sensq's own rounding
        assert "proj_out" in audited["kept"]
    plan = json.loads((tmp_path / "theirs.json").read_text())
    planned = {(r["match"].split(":")[0], r["match"].split(":")[1]): r["weight"] for r in plan["rules"][:-1]}
    assert set(planned.values()) == {"nvfp4_ts", "int8", "mxfp8"} and len(planned) == sum(map(len, deployed.values()))
    # the round trip: sensq's plan and the plan audited from its ComfyUI files generate the same latents, bit for
    # bit (the codes are kept), in one ablation
    ablation = CliRunner().invoke(main, ["ablate", str(workspace / "ranking.json"), "--plans",
                                         str(tmp_path / "mixed.json"), "--plans", str(tmp_path / "theirs.json"),
                                         "--only-plans", "--limit", "1", "--seeds", "1", "--out",
                                         str(tmp_path / "ablation")])
    assert ablation.exit_code == 0, ablation.output
    rows = {row["set"]: row for row in json.loads((tmp_path / "ablation" / "ablation.json").read_text())["rows"]}
    latents = [load_file(str(path))["latents"] for name in ("mixed", "theirs")
               for path in sorted((tmp_path / "ablation" / rows[name]["folder"]).rglob("latents/*.safetensors"))]
    assert len(latents) == 2 and torch.equal(latents[0], latents[1])
    assert rows["mixed"]["metrics"]["latent_nmse"] == rows["theirs"]["metrics"]["latent_nmse"] > 0
    crossed = load_file(str(tmp_path / "comfy" / "high.safetensors"))
    _swap_nibbles(crossed, "blocks.1.cross_attn.q")
    for key in ("blocks.1.ffn.0", "blocks.0.self_attn.q"):  # a scale stored as a divisor: NVFP4's tensor scale, INT8's
        crossed[f"{key}.weight_scale" + ("_2" if key.endswith("ffn.0") else "")] **= -1
    save_file(crossed, str(tmp_path / "high.safetensors"))
    flagged = CliRunner().invoke(main, ["audit", str(tmp_path / "high.safetensors"), "--model", "tiny"])
    assert flagged.exit_code == 0, flagged.output
    suspects = sorted(line for line in flagged.stderr.splitlines() if "suspect:" in line)
    assert len(suspects) == 3, flagged.stderr
    for suspect, layer in zip(suspects, ("blocks.0.self_attn.q (int8_tensorwise)", "blocks.1.cross_attn.q (nvfp4)",
                                         "blocks.1.ffn.0 (nvfp4)"), strict=True):
        assert layer in suspect, suspects


def test_audit_of_a_gguf_and_its_plan_measured_by_ablate(workspace, tmp_path):
    pytest.importorskip("gguf", reason="tested with gguf: pip install -e '.[deploy]'")
    checkpoint = _checkpoint(workspace, tmp_path, INT4_RULES, "int4")
    _export(checkpoint, "gguf", tmp_path / "gguf")
    result = CliRunner().invoke(main, ["audit", str(tmp_path / "gguf" / "high.gguf"), str(tmp_path / "gguf" /
                                                                                            "low.gguf"),
                                       "--model", "tiny", "--json", "--plan-out", str(tmp_path / "theirs.json")])
    assert result.exit_code == 0, result.output
    for audited in json.loads(result.stdout):
        assert audited["kind"] == "gguf" and audited["suspect"] == []
        assert {layer["fmt"] for layer in audited["quantized"]} == {"Q4_0"}
        assert "patch_embedding" in {layer["name"] for layer in audited["quantized"]}
    ablation = CliRunner().invoke(main, ["ablate", str(workspace / "ranking.json"), "--plans",
                                         str(tmp_path / "theirs.json"), "--only-plans", "--limit", "1", "--seeds",
                                         "1", "--out", str(tmp_path / "ablation")])
    assert ablation.exit_code == 0, ablation.output
    rows = {row["set"]: row for row in json.loads((tmp_path / "ablation" / "ablation.json").read_text())["rows"]}
    assert rows["theirs"]["metrics"]["latent_nmse"] > 0 and rows["theirs"]["kind"] == "plan"


@pytest.mark.parametrize("fmt, kind_name, block_bytes", [("q4_k", "Q4_K", 144), ("q6_k", "Q6_K", 210)])
def test_k_quant_blocks_are_gguf_k_quants_bit_for_bit(fmt, kind_name, block_bytes):
    """sensq's q4_k (codes, scales and mins) and q6_k (codes, signed scales) laid out as GGUF's Q4_K and Q6_K:
    gguf's own dequantizer gives exactly the weight sensq decodes (and the error a plan measures), including a
    zero row, outliers of either sign and a NaN super-block."""
    gguf = pytest.importorskip("gguf", reason="tested with gguf: pip install -e '.[deploy]'")
    import numpy as np

    from sensq.export.gguf import _layer
    from sensq.export.target import Layer
    from sensq.formats import pack, quantize_dequantize, unpack

    weight = torch.randn(6, 768, generator=torch.Generator().manual_seed(3)) * torch.logspace(-3, 2, 768)
    weight[1] = 0.0
    weight[2, 300:310] += 40.0  # an outlier in one sub-block
    weight[3, 600:604] -= 40.0  # and a negative one (Q6_K maps it onto -32)
    packed = pack(weight, fmt)
    ours = unpack(packed)
    assert torch.equal(ours, quantize_dequantize(weight, fmt))
    written = _layer(Layer("blocks.0.attn1.to_q", "blocks.0.self_attn.q", packed, ours, None, (6, 768)))
    raw, kind, _ = written.tensors["blocks.0.self_attn.q.weight"]
    assert kind == getattr(gguf.GGMLQuantizationType, kind_name) and raw.shape == (6, 3 * block_bytes)
    theirs = torch.from_numpy(gguf.quants.dequantize(raw, kind).astype(np.float32))
    assert torch.equal(theirs, ours) and written.nmse == 0.0 and written.kind == kind_name
    poisoned = weight.clone()
    poisoned[4, 520] = float("nan")
    raw, kind, _ = _layer(Layer("x", "x", pack(poisoned, fmt), unpack(pack(poisoned, fmt)), None,
                                (6, 768))).tensors["x.weight"]
    decoded = gguf.quants.dequantize(raw, kind)
    assert np.isnan(decoded[4, 512:768]).all() and not np.isnan(decoded[4, :512]).any()


def test_mxfp8_is_comfyuis_mxfp8_bit_for_bit():
    """sensq's mxfp8 (OCP: scale 2^(floor(log2 amax) - 8), saturating) exported as ComfyUI's mxfp8 layout:
    comfy-kitchen's dequantizer reads sensq's codes and swizzled E8M0 scales to sensq's weight exactly; its own
    quantizer picks the scale that never saturates, so its codes differ while both decode alike."""
    pytest.importorskip("comfy_kitchen", reason="tested with comfy-kitchen: pip install -e '.[deploy]'")
    from comfy_kitchen.tensor import TensorCoreMXFP8Layout

    from sensq.export.comfyui import _layer
    from sensq.export.target import Layer
    from sensq.formats import pack, quantize_dequantize, unpack

    weight = torch.randn(130, 96, generator=torch.Generator().manual_seed(5)) * torch.logspace(-4, 3, 96)
    weight[7] = 0.0
    packed = pack(weight, "mxfp8")
    ours = unpack(packed)
    assert torch.equal(ours, quantize_dequantize(weight, "mxfp8"))
    written = _layer(Layer("blocks.0.attn1.to_q", "blocks.0.self_attn.q", packed, ours, None, (130, 96)))
    state = written.tensors
    scale = state["blocks.0.self_attn.q.weight_scale"]
    assert scale.dtype == torch.uint8  # as the shared Wan2.2 MXFP8 files store it; comfy-kitchen reads E8M0
    params = TensorCoreMXFP8Layout.Params(scale=scale.view(torch.float8_e8m0fnu), orig_dtype=torch.float32,
                                          orig_shape=(130, 96))
    theirs = TensorCoreMXFP8Layout.dequantize(state["blocks.0.self_attn.q.weight"], params)
    assert torch.equal(theirs, ours) and written.kind == "mxfp8"
    # the OCP rule: the block's largest element maps into E4M3's top binade, saturating at 448
    blocks = weight.reshape(130, 3, 32)
    amax = blocks.abs().amax(-1)
    scale = torch.exp2(torch.floor(torch.log2(amax[amax > 0])) - 8)
    assert torch.all(amax[amax > 0] / scale >= 256) and torch.all(amax[amax > 0] / scale < 512)


def test_fp8_e4m3_tensor_is_comfyuis_float8_e4m3fn_bit_for_bit(workspace, tmp_path):
    """A plan in fp8_e4m3_tensor exports as ComfyUI's float8_e4m3fn layers (scalar weight_scale), which
    comfy-kitchen's FP8 layout dequantizes to sensq's weights exactly; audit reads them back as sound."""
    pytest.importorskip("comfy_kitchen", reason="tested with comfy-kitchen: pip install -e '.[deploy]'")
    from comfy_kitchen.tensor import TensorCoreFP8Layout

    rules = [{"match": "re:(high|low):(proj_out|patch_embedding)", "weight": None, "activation": None},
             {"match": "re:(high|low):.*", "weight": "fp8_e4m3_tensor", "activation": "fp8_e4m3_tensor"}]
    checkpoint = _checkpoint(workspace, tmp_path, rules, "fp8")
    _, deployed = _deployed(checkpoint)
    _export(checkpoint, "comfyui", tmp_path / "comfy")
    for expert, layers in deployed.items():
        state = load_file(str(tmp_path / "comfy" / f"{expert}.safetensors"))
        for key, (fmt, weight) in layers.items():
            assert json.loads(bytes(state[f"{key}.comfy_quant"].tolist()).decode()) == {"format": "float8_e4m3fn"}
            assert state[f"{key}.weight_scale"].shape == () and fmt == "fp8_e4m3_tensor"
            params = TensorCoreFP8Layout.Params(scale=state[f"{key}.weight_scale"], orig_dtype=torch.float32,
                                                orig_shape=tuple(weight.shape))
            assert torch.equal(TensorCoreFP8Layout.dequantize(state[f"{key}.weight"], params), weight), key
    audited = CliRunner().invoke(main, ["audit", str(tmp_path / "comfy" / "high.safetensors"), "--model", "tiny",
                                        "--json"])
    assert audited.exit_code == 0, audited.output
    result = json.loads(audited.stdout)[0]
    assert {layer["fmt"] for layer in result["quantized"]} == {"float8_e4m3fn"} and result["suspect"] == []
