"""The embedded trained models: shipped bytes are the recorded ones; they follow their prompts."""

import hashlib
from pathlib import Path

import torch
from click.testing import CliRunner

from sensq.cli import main
from sensq.loading import load_model
from sensq.models import PROCEDURAL_MODELS, TRAINED_DIR

RANDOM_CHANCE = (1 / 5 + 1 / 4 + 1 / 3) / 3  # colour, direction and shape checks by guessing: 0.26


def test_weights_match_their_recorded_sha256():
    lines = (TRAINED_DIR / "SHA256SUMS").read_text().splitlines()
    recorded = {line.split()[1]: line.split()[0] for line in lines}
    shipped = {"./" + p.relative_to(TRAINED_DIR).as_posix() for p in TRAINED_DIR.rglob("*")
               if p.is_file() and p.name != "SHA256SUMS"}
    assert set(recorded) == shipped
    for name, digest in recorded.items():
        assert hashlib.sha256((TRAINED_DIR / name).read_bytes()).hexdigest() == digest, name
    assert sum((TRAINED_DIR / n).stat().st_size for n in recorded) < 25_000_000  # small enough for git


def test_trained_models_load_as_two_expert_wan_pipelines():
    for name in PROCEDURAL_MODELS:
        model = load_model(name, torch.device("cpu"), torch.float32)
        assert model.model_id == name and model.pipe.config.boundary_ratio == 0.875
        high, low = model.pipe.transformer, model.pipe.transformer_2
        assert not torch.equal(high.blocks[0].attn1.to_q.weight, low.blocks[0].attn1.to_q.weight)
        assert model.default_resolution == (32, 32, 9)


def test_the_4_step_student_follows_its_prompts(tmp_path):
    """8 procedural prompts, the Lightning 4-step schedule: prompt consistency far above chance."""
    runner = CliRunner()
    out = tmp_path / "run"
    generated = runner.invoke(main, ["generate", "--model", "tiny-trained-4step", "--preset", "lightning-4step",
                                     "--limit", "8", "--no-video", "--out", str(out)])
    assert generated.exit_code == 0, generated.output
    scored = runner.invoke(main, ["eval", str(out), "--json"])
    assert scored.exit_code == 0, scored.output
    import json

    aggregate = json.loads(scored.stdout)["procedural"]["aggregate"]
    assert aggregate["overall_consistency"] > 2 * RANDOM_CHANCE
    assert Path(out / "procedural.json").is_file()


def test_plans_validate_against_the_shipped_models_without_loading_weights():
    from sensq.models import layer_inventory

    for name in PROCEDURAL_MODELS:
        layers = layer_inventory(name)
        assert {layer.expert for layer in layers} == {"high", "low"}
        blocks = 20 if name.startswith("tiny-deep") else 4
        assert len([layer for layer in layers if layer.expert == "high"]) == 6 + 10 * blocks + 1


def test_the_deep_model_has_a14b_like_proportions():
    """At least 16 blocks per expert and the entrance under 10% of each expert's parameters, as on A14B:
    a 5-20% budget is a real choice there, and ModelOpt's fixed first/last-blocks set applies."""
    from sensq.models import layer_inventory
    from sensq.models.wan import WAN22_A14B

    family = WAN22_A14B
    for name in ("tiny-deep", "tiny-deep-4step"):
        layers = layer_inventory(name)
        for expert in ("high", "low"):
            mine = [layer for layer in layers if layer.expert == expert]
            assert len({layer.name.split(".")[1] for layer in mine if layer.name.startswith("blocks.")}) >= 16
            entrance = sum(layer.params for layer in mine if family.is_entrance(layer.name))
            assert entrance < 0.10 * sum(layer.params for layer in mine)
