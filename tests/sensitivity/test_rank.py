"""The sensitivity engine: metric definitions, a deliberately fragile layer ranks first, determinism, errors."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from sensq.cli import main
from sensq.errors import InputError, SensqError
from sensq.formats import get_format, quantize_dequantize
from sensq.loading import load_model
from sensq.metrics import nmse
from sensq.models import model_fingerprint
from sensq.probes.recorder import ProbeRequest, run_probe
from sensq.prompts import load_prompts
from sensq.sensitivity import Ranking, RankRequest, rank_layers
from sensq.sensitivity.local import layer_scores, reduce_steps
from sensq.store.probe_file import ProbeFile
from sensq.trajectory import Trajectory

FRAGILE = "blocks.1.ffn.net.2"


@pytest.fixture(scope="module")
def fragile(tmp_path_factory):
    """The tiny model with one layer of the low-noise expert made fragile, and its probe file.

    The classic activation outlier: channel 5 of the FFN's hidden state is scaled up by 300 (net.0.proj
    row and bias) and scaled back down in net.2's weight column, so the full-precision function barely
    changes while every token block of net.2's input is dominated by one channel. net.2 also writes 20x
    more into the residual stream, so that its error reaches the final latents (in the random-weight tiny
    model the block outputs are gated small and proj_out / patch_embedding dominate e2e otherwise).
    """
    model = load_model("tiny", torch.device("cpu"), torch.float32)
    ffn = model.pipe.transformer_2.blocks[1].ffn
    with torch.no_grad():
        ffn.net[0].proj.weight[5] *= 300.0
        ffn.net[0].proj.bias[5] *= 300.0
        ffn.net[2].weight[:, 5] /= 300.0
        ffn.net[2].weight *= 20.0
        ffn.net[2].bias *= 20.0
    model.fingerprint = model_fingerprint(model.pipe, model.family)
    out = tmp_path_factory.mktemp("probe") / "probe.h5"
    trajectory = Trajectory(steps=4).with_resolution(model.default_resolution)
    run_probe(ProbeRequest(model, trajectory, load_prompts(None, 2), ["high", "low"], out))
    return model, out


def test_mse_matches_the_definition(fragile):
    model, probe_path = fragile
    with ProbeFile(probe_path) as probe:
        samples = probe.read("high", "blocks.0.ffn.net.2", "samples")
    module = model.pipe.transformer.get_submodule("blocks.0.ffn.net.2")
    scores = layer_scores(module, samples, [get_format("hif4")], "mse").per_step["hif4"]
    assert scores.shape == (2, 2)
    x = torch.from_numpy(samples[:, 1, 0]).reshape(-1, samples.shape[-1])  # step 1, cond, all prompts
    y = F.linear(x, module.weight, module.bias)
    y_q = F.linear(quantize_dequantize(x, "hif4"), quantize_dequantize(module.weight.detach(), "hif4"), module.bias)
    assert scores[1, 0] == pytest.approx(nmse(y.detach(), y_q.detach()), rel=1e-6)


def test_reductions():
    per_step = np.array([[1.0, 3.0], [5.0, 7.0]])
    assert reduce_steps(per_step, np.array([0.9, 0.1]), "mean") == 4.0
    assert reduce_steps(per_step, np.array([0.9, 0.1]), "max") == 6.0
    # weights 1/0.9 and 1/0.1: the late step dominates
    assert reduce_steps(per_step, np.array([0.9, 0.1]), "late-weighted") == pytest.approx((2 / 0.9 + 6 / 0.1) /
                                                                                           (1 / 0.9 + 1 / 0.1))
    # a non-finite step is left out by every reduction alike; all non-finite is inf
    broken = np.array([[1.0, 3.0], [np.inf, np.inf], [5.0, 7.0]])
    sigmas = np.array([0.9, 0.5, 0.1])
    for how, expected in (("mean", 4.0), ("max", 6.0),
                          ("late-weighted", (2 / 0.9 + 6 / 0.1) / (1 / 0.9 + 1 / 0.1))):
        assert reduce_steps(broken, sigmas, how) == pytest.approx(expected), how
        assert reduce_steps(np.full((2, 2), np.nan), sigmas[:2], how) == np.inf, how


@pytest.mark.parametrize("metric", ["mse", "sqnr", "cosine"])
def test_fragile_layer_ranks_first_on_local_metrics(fragile, metric):
    model, probe_path = fragile
    ranking = rank_layers(RankRequest(probe_path, model, ["hif4", "nvfp4"], metric=metric))
    assert ranking.ordered("low")[0].name == FRAGILE
    assert ranking.ordered("high")[0].name != FRAGILE  # only the low-noise expert was made fragile


def test_fragile_layer_ranks_first_end_to_end(fragile):
    model, probe_path = fragile
    ranking = rank_layers(RankRequest(probe_path, model, ["hif4"], metric="e2e", experts=["low"], limit=1))
    assert ranking.ordered("low")[0].name == FRAGILE
    assert all(layer.value["hif4"] >= 0 for layer in ranking.experts["low"])
    blocks = rank_layers(RankRequest(probe_path, model, ["hif4"], metric="e2e", experts=["low"], limit=1,
                                     granularity="block"))
    top = blocks.ordered("low")[0]
    assert top.name == "blocks.1" and FRAGILE in top.members and top.kind == "block"
    out = rank_layers(RankRequest(probe_path, model, ["hif4"], metric="e2e", experts=["low"], limit=1,
                                  mode="leave-one-out"))
    assert out.ordered("low")[0].name == FRAGILE


def test_ranking_is_deterministic_and_round_trips(fragile, tmp_path):
    model, probe_path = fragile
    first = rank_layers(RankRequest(probe_path, model, ["hif4", "mxfp4"]))
    second = rank_layers(RankRequest(probe_path, model, ["hif4", "mxfp4"]))
    for expert in first.experts:
        assert [(layer.name, layer.value, layer.rank) for layer in first.experts[expert]] == \
               [(layer.name, layer.value, layer.rank) for layer in second.experts[expert]]
    first.save(tmp_path / "r.json")
    loaded = Ranking.load(tmp_path / "r.json")
    assert loaded.ordered("low")[0].name == FRAGILE
    assert loaded.provenance["probe_sha256"] == first.provenance["probe_sha256"]
    assert set(first.agreement["low"]) == {"hif4 vs mxfp4"}


def test_probe_from_another_model_needs_force(fragile):
    _, probe_path = fragile
    clean = load_model("tiny", torch.device("cpu"), torch.float32)
    with pytest.raises(InputError, match="was probed on model 'tiny' \\(fingerprint .*\\) but --model 'tiny' has "
                                         "fingerprint .*; rank with the same model, or pass --force"):
        rank_layers(RankRequest(probe_path, clean, ["hif4"]))
    assert rank_layers(RankRequest(probe_path, clean, ["hif4"], force=True)).experts


@pytest.mark.parametrize("kwargs,message", [
    ({"formats": ["hif5"]}, "unknown format 'hif5'"),
    ({"formats": []}, "--format needs at least one format"),
    ({"metric": "kl"}, "unknown metric 'kl'"),
    ({"reduce": "median"}, "unknown reduction 'median'"),
    ({"granularity": "block"}, "--granularity block needs --metric e2e"),
    ({"experts": ["mid"]}, "expert 'mid' is not in"),
])
def test_bad_requests(fragile, kwargs, message):
    model, probe_path = fragile
    request = {"formats": ["hif4"], **kwargs}
    with pytest.raises(SensqError, match=message):
        rank_layers(RankRequest(probe_path, model, **request))


def test_ranking_file_errors(tmp_path):
    with pytest.raises(InputError, match="ranking file not found"):
        Ranking.load(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(InputError, match="is not valid JSON"):
        Ranking.load(tmp_path / "bad.json")
    (tmp_path / "plan.json").write_text(json.dumps({"schema": "sensq.plan/1"}))
    with pytest.raises(InputError, match="has schema 'sensq.plan/1'; expected 'sensq.ranking/1'"):
        Ranking.load(tmp_path / "plan.json")
    (tmp_path / "empty.json").write_text(json.dumps({"schema": "sensq.ranking/1", "experts": {"high": []}}))
    with pytest.raises(InputError, match="is not a valid ranking: the document lacks the field 'metric'"):
        Ranking.load(tmp_path / "empty.json")
    empty = {"schema": "sensq.ranking/1", "metric": "mse", "reduce": "mean", "formats": ["hif4"],
             "experts": {"high": []}, "steps": {}, "sigmas": {}, "branches": ["cond"], "provenance": {}}
    (tmp_path / "empty.json").write_text(json.dumps(empty))
    with pytest.raises(InputError, match="ranks no layer"):
        Ranking.load(tmp_path / "empty.json")


def test_cli_rank(tmp_path):
    runner = CliRunner()
    probe = tmp_path / "p.h5"
    assert runner.invoke(main, ["probe", "--limit", "1", "--out", str(probe)]).exit_code == 0
    out = tmp_path / "ranking.json"
    result = runner.invoke(main, ["rank", str(probe), "--format", "hif4,int4", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["schema"] == "sensq.ranking/1" and data["formats"] == ["hif4", "int4"]
    assert json.loads(out.read_text())["experts"].keys() == {"high", "low"}
    table = runner.invoke(main, ["rank", str(probe), "--out", str(out), "--top", "3"], terminal_width=160)
    assert table.exit_code == 0 and "high-noise expert: top 3 of 27" in table.output
    missing = runner.invoke(main, ["rank", str(Path(tmp_path / "none.h5"))])
    assert missing.exit_code == 1 and "probe file not found" in missing.output


@pytest.mark.parametrize("metric", ["mse", "sqnr", "cosine"])
def test_recorded_outputs_give_the_same_ranking(fragile, tmp_path, metric):
    """A probe with --outputs: the reference comes from the recorded outputs (no FP GEMM), the values equal the
    recomputed ones to fp32 summation order, and the order of the layers is the same."""
    from sensq.probes.capture import ProbeConfig

    model, probe_path = fragile
    with_outputs = tmp_path / "outputs.h5"
    trajectory = Trajectory(steps=4).with_resolution(model.default_resolution)
    run_probe(ProbeRequest(model, trajectory, load_prompts(None, 2), ["high", "low"], with_outputs,
                           config=ProbeConfig(outputs=True)))
    recorded = rank_layers(RankRequest(with_outputs, model, ["hif4"], metric=metric))
    recomputed = rank_layers(RankRequest(probe_path, model, ["hif4"], metric=metric))
    assert recorded.provenance["reference"] == "recorded outputs"
    assert recomputed.provenance["reference"] == "recomputed from the samples"
    for expert in ("high", "low"):
        names = [layer.name for layer in recorded.ordered(expert)]
        assert names == [layer.name for layer in recomputed.ordered(expert)]
        by_name = {layer.name: layer.value["hif4"] for layer in recomputed.experts[expert]}
        for layer in recorded.experts[expert]:
            assert layer.value["hif4"] == pytest.approx(by_name[layer.name], rel=1e-4, abs=1e-9)
    assert recorded.ordered("low")[0].name == FRAGILE


def test_a_metric_declared_once_is_ranked(fragile, monkeypatch):
    """A new metric is one entry of the registry: rank_layers computes it, orders by its direction and
    refuses block granularity for it (it is local)."""
    from sensq.metrics import METRICS, Metric

    def max_abs(reference, approx):
        return float((reference - approx).abs().max())

    monkeypatch.setitem(METRICS, "max-abs", Metric("max-abs", "largest absolute output error", "output", max_abs))
    model, probe_path = fragile
    ranking = rank_layers(RankRequest(probe_path=probe_path, model=model, formats=["hif4"], metric="max-abs",
                                      experts=["low"]))
    with ProbeFile(probe_path) as probe:
        samples = probe.read("low", FRAGILE, "samples")
    module = model.pipe.transformer_2.get_submodule(FRAGILE)
    x = torch.from_numpy(samples[:, 0, 0]).reshape(-1, samples.shape[-1])  # first step, cond, all prompts
    y = F.linear(x, module.weight, module.bias).detach()
    y_q = F.linear(quantize_dequantize(x, "hif4"), quantize_dequantize(module.weight.detach(), "hif4"),
                   module.bias).detach()
    layer = next(layer for layer in ranking.experts["low"] if layer.name == FRAGILE)
    assert layer.per_step["hif4"][0][0] == pytest.approx(max_abs(y, y_q), rel=1e-6)
    ordered = sorted(ranking.experts["low"], key=lambda layer: layer.rank["hif4"])
    assert [layer.value["hif4"] for layer in ordered] == sorted((layer.value["hif4"] for layer in ordered),
                                                                reverse=True)
    with pytest.raises(InputError, match="--granularity block needs --metric e2e"):
        rank_layers(RankRequest(probe_path=probe_path, model=model, formats=["hif4"], metric="max-abs",
                                granularity="block"))
