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
