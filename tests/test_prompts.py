import json

import pytest

from sensq.errors import InputError
from sensq.prompts import DEFAULT_PROMPTS, load_prompts


def test_default_prompts():
    prompts = load_prompts(None, limit=2)
    assert [p.text for p in prompts] == list(DEFAULT_PROMPTS[:2]) and [p.index for p in prompts] == [0, 1]


def test_text_file_skips_blank_lines(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("a cat\n\n  a dog  \nthe sea\n")
    prompts = load_prompts(path)
    assert [(p.index, p.text) for p in prompts] == [(0, "a cat"), (1, "a dog"), (2, "the sea")]
    assert [p.index for p in load_prompts(path, limit=2)] == [0, 1]


def test_json_list(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(["a", "b"]))
    assert [p.text for p in load_prompts(path)] == ["a", "b"]


def test_opens2v_records(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps([
        {"face_cap_qwen": "a woman smiling", "cap": ["ignored"]},
        {"cap": ["a man walking", "second caption"], "negative_prompt": "blurry"},
    ]))
    prompts = load_prompts(path)
    assert [(p.text, p.negative) for p in prompts] == [("a woman smiling", ""), ("a man walking", "blurry")]


def test_vbench_lists(tmp_path):
    full_info = tmp_path / "VBench_full_info.json"
    full_info.write_text(json.dumps([{"prompt_en": "a dog", "dimension": ["subject_consistency"]}]))
    assert load_prompts(full_info)[0].text == "a dog"
    per_dimension = tmp_path / "dims.json"
    per_dimension.write_text(json.dumps({"subject_consistency": ["x", "y"], "motion_smoothness": ["z"]}))
    assert [(p.index, p.text) for p in load_prompts(per_dimension)] == [(0, "x"), (1, "y"), (2, "z")]


@pytest.mark.parametrize("content,suffix,message", [
    ("", ".txt", "holds no prompts"),
    ("\n\n", ".txt", "holds no prompts"),
    ("[]", ".json", "holds no prompts"),
    ("{not json", ".json", "is not valid JSON"),
    ('[{"title": "x"}]', ".json", "record 0 has none of face_cap_qwen"),
    ("[3]", ".json", "item 0 is a int, not a prompt"),
    ('"a"', ".json", "expected a JSON list"),
])
def test_bad_files(tmp_path, content, suffix, message):
    path = tmp_path / f"p{suffix}"
    path.write_text(content)
    with pytest.raises(InputError, match=message):
        load_prompts(path)


def test_missing_file_and_bad_limit(tmp_path):
    with pytest.raises(InputError, match="prompt file not found: '.*nope.txt'"):
        load_prompts(tmp_path / "nope.txt")
    with pytest.raises(InputError, match="--limit must be at least 1, got 0"):
        load_prompts(None, limit=0)


# --- OpenS2V sources and filtering (sensq prompts) ---------------------------------------------------

OPENS2V_EVAL = {
    "singleobj_1": {"img_paths": ["Images/cup/52.jpg"], "prompt": "A ceramic cup slowly rotates on a wooden table",
                    "synthesis_flag": "False", "class_label": ["Cup"]},
    "singleobj_2": {"img_paths": ["Images/dog/1.jpg"], "prompt": "A dog runs", "class_label": ["Dog"]},
    "singleface_1": {"img_paths": ["f.jpg"], "prompt": "A woman with short hair smiles at the camera in a park"},
    "humanobj_1": {"img_paths": ["a.jpg", "b.jpg"], "prompt": "A man in a red jacket rides a bicycle at dusk"},
    "humanobj_2": {"img_paths": ["a.jpg"], "prompt": "a man in a red  JACKET rides a bicycle at dusk"},
    "humanobj_3": {"img_paths": ["c.jpg"], "prompt": "A girl holds the object from the reference image and waves"},
}

OPENS2V_5M = {
    "clip_a": {"metadata": {"face_cap_qwen": "A chef chops onions in a bright kitchen", "aesthetic": 5.9,
                            "motion": 3.1, "tech": 1.2, "path": "part_1/a.mp4"}},
    "clip_b": {"metadata": {"cap": ["A blurry street at night"], "aesthetic": 4.2, "motion": 0.5, "tech": 0.4}},
    "clip_c": {"metadata": {"face_cap_qwen": "Two friends laugh on a sofa", "aesthetic": 5.6, "motion": 1.0,
                            "tech": 0.9}},
}


def _write(tmp_path, name, data):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def test_opens2v_eval_dict_gives_keys_and_types(tmp_path):
    prompts = load_prompts(_write(tmp_path, "Open-Domain_Eval.json", OPENS2V_EVAL))
    assert [(p.index, p.key, p.meta["type"]) for p in prompts] == [
        (0, "singleobj_1", "singleobj"), (1, "singleobj_2", "singleobj"), (2, "singleface_1", "singleface"),
        (3, "humanobj_1", "humanobj"), (4, "humanobj_2", "humanobj"), (5, "humanobj_3", "humanobj")]
    assert prompts[0].text == "A ceramic cup slowly rotates on a wooden table"
    assert prompts[0].meta["class_label"] == ["Cup"] and "img_paths" not in prompts[0].meta


def test_opens2v_5m_metadata_dict_list_and_jsonl(tmp_path):
    from_dict = load_prompts(_write(tmp_path, "part1.json", OPENS2V_5M))
    assert [(p.key, p.text) for p in from_dict] == [("clip_a", "A chef chops onions in a bright kitchen"),
                                                    ("clip_b", "A blurry street at night"),
                                                    ("clip_c", "Two friends laugh on a sofa")]
    assert from_dict[0].meta == {"aesthetic": 5.9, "motion": 3.1, "tech": 1.2}
    lines = "\n".join(json.dumps(record) for record in OPENS2V_5M.values()) + "\n\n"
    from_jsonl = load_prompts(_write(tmp_path, "part1.jsonl", lines))
    assert [(p.index, p.text, p.meta["motion"]) for p in from_jsonl] == [
        (p.index, p.text, p.meta["motion"]) for p in from_dict]


def test_mixed_json_object_is_refused(tmp_path):
    with pytest.raises(InputError, match="must map dimension names to lists of prompts .VBench. or ids to records"):
        load_prompts(_write(tmp_path, "p.json", {"a": ["x"], "b": {"prompt": "y"}}))
    with pytest.raises(InputError, match="record clip_x has none of"):
        load_prompts(_write(tmp_path, "q.json", {"clip_x": {"metadata": {"aesthetic": 5}}}))


def test_filters_each_step_and_counts(tmp_path):
    from sensq.prompts import PromptFilter, filter_prompts

    prompts = load_prompts(_write(tmp_path, "e.json", OPENS2V_EVAL))
    kept, dropped = filter_prompts(prompts, PromptFilter(exclude_types=("singleface",), min_words=4,
                                                         exclude="reference image", dedupe=True))
    assert [p.key for p in kept] == ["singleobj_1", "humanobj_1"]
    assert dropped == {"type in singleface": 1, "fewer than 4 words": 1, "matches 'reference image'": 1,
                       "duplicate": 1}
    kept, dropped = filter_prompts(prompts, PromptFilter(types=("humanobj", "singleobj"), per_type=1))
    assert [p.key for p in kept] == ["singleobj_1", "humanobj_1"]
    assert dropped == {"type not in humanobj,singleobj": 1, "beyond 1 per type": 3}
    kept, _ = filter_prompts(prompts, PromptFilter(max_words=7))
    assert [p.key for p in kept] == ["singleobj_2"]


def test_score_filters_and_sample(tmp_path):
    from sensq.prompts import PromptFilter, filter_prompts

    prompts = load_prompts(_write(tmp_path, "m.json", OPENS2V_5M))
    kept, dropped = filter_prompts(prompts, PromptFilter(min_aesthetic=5.5, min_motion=2))
    assert [p.key for p in kept] == ["clip_a"] and dropped == {"aesthetic < 5.5": 1, "motion < 2": 1}
    first, _ = filter_prompts(prompts, PromptFilter(sample=2, seed=1))
    again, dropped = filter_prompts(prompts, PromptFilter(sample=2, seed=1))
    assert [p.key for p in first] == [p.key for p in again] and dropped == {"not in the 2 sampled": 1}
    assert [p.index for p in first] == sorted(p.index for p in first)  # file order kept
    seeds = {tuple(p.key for p in filter_prompts(prompts, PromptFilter(sample=1, seed=s))[0]) for s in range(20)}
    assert len(seeds) == 3  # every prompt can be drawn


@pytest.mark.parametrize("spec,message", [
    ({"min_aesthetic": 5.0}, "--min-aesthetic: 6 of 6 prompts have no 'aesthetic' score"),
    ({"exclude": "("}, "--exclude '\\(' is not a valid regex"),
    ({"sample": 0}, "--sample must be at least 1, got 0"),
])
def test_filter_errors(tmp_path, spec, message):
    from sensq.prompts import PromptFilter, filter_prompts

    with pytest.raises(InputError, match=message):
        filter_prompts(load_prompts(_write(tmp_path, "e.json", OPENS2V_EVAL)), PromptFilter(**spec))
    with pytest.raises(InputError, match="the prompt file has no types"):
        filter_prompts(load_prompts(None), PromptFilter(types=("singleobj",)))


def test_written_file_reads_back_with_provenance(tmp_path):
    from sensq.prompts import PromptFilter, filter_prompts, write_prompts

    prompts = load_prompts(_write(tmp_path, "e.json", OPENS2V_EVAL))
    kept, _ = filter_prompts(prompts, PromptFilter(types=("humanobj",), dedupe=True))
    write_prompts(tmp_path / "study.json", kept)
    again = load_prompts(tmp_path / "study.json")
    assert [(p.index, p.key, p.text, p.meta["type"], p.meta["source_index"]) for p in again] == [
        (0, "humanobj_1", kept[0].text, "humanobj", 3), (1, "humanobj_3", kept[1].text, "humanobj", 5)]
    # filtering the filtered file keeps the first source's index
    write_prompts(tmp_path / "again.json", filter_prompts(again, PromptFilter(per_type=1))[0])
    assert json.loads((tmp_path / "again.json").read_text())[0]["source_index"] == 3


def test_prompts_cli(tmp_path):
    from click.testing import CliRunner

    from sensq.cli import main

    source = _write(tmp_path, "Open-Domain_Eval.json", OPENS2V_EVAL)
    out = tmp_path / "study.json"
    result = CliRunner().invoke(main, ["prompts", str(source), "--exclude-type", "singleface", "--min-words", "4",
                                       "--dedupe", "--out", str(out)], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "kept 3 of 6" in result.output and "1 duplicate" in result.output and f"wrote 3 prompts to {out}" in \
        result.output
    assert [p.key for p in load_prompts(out)] == ["singleobj_1", "humanobj_1", "humanobj_3"]
    result = CliRunner().invoke(main, ["prompts", str(source), "--type", "humanobj", "--json"])
    data = json.loads(result.output)
    assert data["kept"] == 3 and data["dropped"] == {"type not in humanobj": 3}
    assert [p["index"] for p in data["prompts"]] == [3, 4, 5]
    result = CliRunner().invoke(main, ["prompts", str(source), "--type", "nope"])
    assert result.exit_code == 1 and "no prompt of 6" in result.output and "6 type not in nope" in result.output


def test_vbench_full_info_dimension_filter(tmp_path):
    from sensq.prompts import PromptFilter, filter_prompts

    path = _write(tmp_path, "VBench_full_info.json", [
        {"prompt_en": "a dog running", "dimension": ["subject_consistency", "motion_smoothness"]},
        {"prompt_en": "a quiet lake", "dimension": ["aesthetic_quality"]},
        {"prompt_en": "a cat", "dimension": ["object_class"]},
    ])
    prompts = load_prompts(path)
    assert prompts[0].meta["dimension"] == ["subject_consistency", "motion_smoothness"]
    kept, dropped = filter_prompts(prompts, PromptFilter(dimensions=("motion_smoothness", "aesthetic_quality")))
    assert [p.text for p in kept] == ["a dog running", "a quiet lake"]
    assert dropped == {"no dimension in motion_smoothness,aesthetic_quality": 1}
    with pytest.raises(InputError, match="no VBench dimensions"):
        filter_prompts(load_prompts(None), PromptFilter(dimensions=("aesthetic_quality",)))
