import pytest
from click.testing import CliRunner

from sensq.cli import main
from sensq.errors import InputError
from sensq.plan import build_plan
from sensq.report.ranking import write_ranking_report
from sensq.sensitivity.ranking import LayerRank, Ranking

pytest.importorskip("matplotlib")


def _ranking(per_step=True):
    experts = {}
    for expert in ("high", "low"):
        layers = [LayerRank("patch_embedding", "conv3d", 10, 64, 8, True, False, {"hif4": 0.5},
                            per_step={"hif4": [[0.5, 0.4], [0.6, 0.5]]} if per_step else {}, rank={"hif4": 1})]
        for i in range(5):
            layers.append(LayerRank(f"blocks.1.l{i}", "linear", 100, 64, 8, False, False, {"hif4": 0.1 / (i + 1)},
                                    per_step={"hif4": [[0.1, 0.1], [0.1, 0.2]]} if per_step else {},
                                    rank={"hif4": i + 2}))
        experts[expert] = layers
    return Ranking("mse", "mean", ["hif4"], experts, {"high": [0, 1], "low": [2, 3]},
                   {"high": [1.0, 0.9], "low": [0.7, 0.5]}, ["cond", "uncond"], {"probe_file": "p.h5"})


def test_report_files_and_self_contained_html(tmp_path):
    ranking = _ranking()
    plan = build_plan(ranking, top_k=1)
    result = write_ranking_report(ranking, tmp_path, plan=plan, commands=["sensq rank p.h5"])
    names = sorted(p.rsplit("/", 1)[-1] for p in result.files)
    assert names == ["high_heatmap.png", "high_top.png", "low_heatmap.png", "low_top.png", "report.html",
                     "report.md"]
    page = (tmp_path / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 4 and "sensq rank p.h5" in page
    markdown = (tmp_path / "report.md").read_text()
    # plan protects the entrance and the top layer: both marked
    assert "| 1 | `patch_embedding` | 10 | 0.5 | yes |" in markdown
    assert "| 2 | `blocks.1.l0` | 100 | 0.1 | yes |" in markdown
    assert "| 3 | `blocks.1.l1` | 100 | 0.05 |  |" in markdown
    assert (tmp_path / "high_heatmap.png").read_bytes()[:4] == b"\x89PNG"


def test_e2e_ranking_has_no_heatmap(tmp_path):
    result = write_ranking_report(_ranking(per_step=False), tmp_path)
    assert not any("heatmap" in f for f in result.files)


def test_missing_matplotlib_is_one_clear_error(tmp_path, hide_package):
    hide_package("matplotlib")
    with pytest.raises(InputError, match=r"sensq report needs matplotlib: pip install 'sensq\[report\]'"):
        write_ranking_report(_ranking(), tmp_path)


def test_cli_report(tmp_path):
    _ranking().save(tmp_path / "ranking.json")
    runner = CliRunner()
    result = runner.invoke(main, ["report", str(tmp_path / "ranking.json"), "--out", str(tmp_path / "rep")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "rep" / "report.html").is_file()
    missing = runner.invoke(main, ["report", str(tmp_path / "none.json")])
    assert missing.exit_code == 1 and "ranking file not found" in missing.output


@pytest.mark.parametrize("value", [0.0, float("nan"), float("inf")])
def test_report_draws_rankings_whose_values_are_all_zero_nan_or_inf(tmp_path, value):
    ranking = _ranking()
    for layers in ranking.experts.values():
        for layer in layers:
            layer.value["hif4"] = value
            layer.per_step["hif4"] = [[value, value], [value, value]]
    path = tmp_path / "ranking.json"
    ranking.save(path)
    result = CliRunner().invoke(main, ["report", str(path), "--out", str(tmp_path / "rep")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "rep" / "high_top.png").stat().st_size > 0
    # a heatmap only where some value is finite; the table shows the values as they are
    assert (tmp_path / "rep" / "high_heatmap.png").exists() == (value == 0.0)
    assert f"| {value:.4g} |" in (tmp_path / "rep" / "report.md").read_text()
    notes = [line for line in result.stderr.splitlines() if line.startswith("note:")]
    if value == 0.0:
        assert notes == []
    else:  # never in silence: one note per expert, in the terminal and at the top of the report
        assert len(notes) == len(ranking.experts) and all("have no finite hif4 value" in n for n in notes), notes
        assert "have no finite hif4 value" in (tmp_path / "rep" / "report.md").read_text()
        assert "Most sensitive" not in (tmp_path / "rep" / "report.md").read_text()  # no order from NaN


def test_report_says_when_plan_and_ranking_disagree_and_follows_the_plans_format(tmp_path):
    from sensq.plan import Plan

    ranking = _ranking()
    for layers in ranking.experts.values():
        for position, layer in enumerate(layers):
            layer.value["nvfp4"] = layer.value["hif4"]
            layer.rank["nvfp4"] = len(layers) - position  # the reverse order
            layer.per_step["nvfp4"] = layer.per_step["hif4"]
    ranking.formats = ["hif4", "nvfp4"]
    ranking.provenance["model_fingerprint"] = "a" * 16
    plan = build_plan(ranking, top_k=1, fmt="nvfp4")
    assert plan.source["ranking_format"] == "nvfp4"
    result = write_ranking_report(ranking, tmp_path / "same", plan=plan)
    assert result.notes == []
    markdown = (tmp_path / "same" / "report.md").read_text()
    assert markdown.index("`blocks.1.l4`") < markdown.index("`patch_embedding`")  # nvfp4 order, not hif4's
    other = Plan(plan.rules, plan.layers, plan.summary, {"id": "other", "fingerprint": "b" * 16},
                 {**plan.source, "ranking_format": "int4"})
    result = write_ranking_report(ranking, tmp_path / "other", plan=other)
    assert len(result.notes) == 2 and "made for model 'other'" in result.notes[0] and "int4" in result.notes[1]
    assert "Note:</b> the plan was made for model" in (tmp_path / "other" / "report.html").read_text()


def test_plan_follows_its_formats_own_ranking_or_refuses():
    ranking = _ranking()
    with pytest.raises(InputError, match="the ranking has no 'nvfp4' scores .*rank with --format nvfp4"):
        build_plan(ranking, top_k=1, fmt="nvfp4")
    assert build_plan(ranking, top_k=1, fmt="nvfp4", rank_format="hif4").source["ranking_format"] == "hif4"


@pytest.mark.parametrize("spread,log", [(1.5, False), (50.0, True)])
def test_bar_chart_uses_a_log_axis_only_over_a_decade_or_more(tmp_path, monkeypatch, spread, log):
    """Over less than a decade a log axis labels its minor ticks and they collide: the bars go linear."""
    import sensq.report.ranking as ranking_report

    scales = []
    monkeypatch.setattr(ranking_report, "save_png", lambda fig, path: scales.append(fig.axes[0].get_xscale()))
    ranking = _ranking()
    for i, layer in enumerate(ranking.experts["high"]):
        layer.value["hif4"] = spread ** (-i / (len(ranking.experts["high"]) - 1))
    from sensq.report import pyplot

    ranking_report._bars(pyplot(), ranking, "high", "hif4", {}, 20, tmp_path / "bars.png")
    assert scales == ["log" if log else "linear"]


def test_layers_kept_at_some_steps_only_are_marked_with_their_range():
    from sensq.plan import LayerInfo, Plan, Rule, resolve
    from sensq.report.ranking import kept_marks

    layers = [LayerInfo("low", name, 100, 64) for name in ("a", "b", "c")]
    rules = [Rule("low:a", None, None), Rule("low:b", None, None, steps=(3, 3)), Rule("low:c", None, None,
                                                                                     sigma=(0.0, 0.25)),
             Rule("re:low:.*", "hif4", "hif4")]
    table, _ = resolve(rules, layers)
    assert kept_marks(Plan(rules, table), "low") == {"a": "yes", "b": "steps 3-3", "c": "sigma 0-0.25"}


@pytest.mark.parametrize("metric, says", [("grad-e2e", "sensq's default"), ("e2e", "ground truth"),
                                          ("mse", "a local metric")])
def test_the_report_says_which_signal_ranked_and_why(tmp_path, metric, says):
    from sensq.report.ranking import ranking_headline

    ranking = _ranking()
    ranking.metric = metric
    ranking.validation = {"experts": {"low": {"spearman": {"mean": 0.9, "low": 0.8, "high": 0.95, "n": 6},
                                              "layers": 6, "weak": False, "top_k": 6, "top_k_overlap": 5}}}
    lines = ranking_headline(ranking, None, "hif4")
    assert lines[0].startswith(f"Ranked by {metric}") and says in lines[0]
    assert "Spearman rho 0.900 [0.800, 0.950] over 6 layers, top-6 overlap 5/6." in lines[1]
