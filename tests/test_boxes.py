import pytest

from medvl.data.boxes import BoxSyntaxError, parse_boxes, render_boxes
from medvl.data.schema import Turn


@pytest.mark.parametrize("style,text", [
    ("grit", "<ref>the liver</ref><box_start>(120,210),(498,603)<box_end>"),
    ("qwenvl", "<ref>the liver</ref><box>(120,210),(498,603)</box>"),
    ("qwen2vl", "<|object_ref_start|>the liver<|object_ref_end|><|box_start|>(120,210),(498,603)<|box_end|>"),
])
def test_parse_and_render_each_style(style, text):
    turns, boxes, seen = parse_boxes([Turn("user", "<image>\nWhere?"), Turn("assistant", text)])
    assert seen == style
    assert turns[1].text == "<ref>the liver</ref><box/>"
    assert boxes[0].bbox == [120, 210, 498, 603] and boxes[0].phrase == "the liver"
    assert boxes[0].turn == 1 and boxes[0].space == "norm1000"
    assert render_boxes(turns, boxes, style)[1].text == text


def test_several_boxes_share_the_preceding_phrase():
    t = "<ref>nodules</ref><box>(1,2),(3,4)</box><box>(5,6),(7,8)</box> and <ref>mass</ref><box>(9,9),(10,10)</box>"
    _, boxes, _ = parse_boxes([Turn("assistant", t)])
    assert [b.phrase for b in boxes] == ["nodules", "nodules", "mass"]


def test_box_without_phrase_and_conversion_between_styles():
    turns, boxes, _ = parse_boxes([Turn("user", "What is in <box_start>(300,300),(420,460)<box_end>?")])
    assert boxes[0].phrase is None
    assert render_boxes(turns, boxes, "qwen2vl")[0].text == "What is in <|box_start|>(300,300),(420,460)<|box_end|>?"


def test_bad_box_body():
    with pytest.raises(BoxSyntaxError, match="4 numbers"):
        parse_boxes([Turn("assistant", "<box_start>(1,2),(3)<box_end>")])


def _grounding_file(tmp_path):
    import json
    from PIL import Image
    Image.new("RGB", (64, 48), (80, 80, 80)).save(tmp_path / "cxr.png")
    rec = {"id": "g1", "image": "cxr.png", "conversations": [
        {"from": "human", "value": "<image>\nWhere is the left lung?"},
        {"from": "gpt", "value": "<|object_ref_start|>left lung<|object_ref_end|><|box_start|>(247,265),(367,497)<|box_end|>"}]}
    (tmp_path / "g.json").write_text(json.dumps([rec]))
    from medvl.data.formats import get_format
    return get_format("grounding").read(tmp_path / "g.json", image_dir=str(tmp_path)).samples[0]


def test_boxes_reach_the_model_with_their_coordinates(tmp_path):
    """data.format grounding trained on '<ref>left lung</ref><box/>' (no numbers); now each model family
    sees the corners in its own syntax, and they parse back to the same box for eval grounding."""
    from medvl.data.boxes import model_turns
    from medvl.eval.classification import parse_boxes_from_text
    s = _grounding_file(tmp_path)
    assert s.conversation[1].text == "<ref>left lung</ref><box/>"
    composed = model_turns(s, "qwenvl")[1].text
    assert composed == "<ref>left lung</ref><box>(247,265),(367,497)</box>"
    qwen = model_turns(s, "qwen2vl")[1].text
    assert qwen == "<|object_ref_start|>left lung<|object_ref_end|><|box_start|>(247,265),(367,497)<|box_end|>"
    for text in (composed, qwen):
        assert parse_boxes_from_text(text) == [[247.0, 265.0, 367.0, 497.0]]


def test_pixel_and_unit_boxes_are_given_to_models_in_the_1000_grid(tmp_path):
    from medvl.data.boxes import model_turns
    from medvl.data.schema import Box
    s = _grounding_file(tmp_path)
    s.boxes = [Box(bbox=[16, 12, 32, 24], space="pixel", image=0, turn=1, phrase="left lung")]  # image 64 x 48
    assert "(250,250),(500,500)" in model_turns(s, "qwenvl")[1].text
    s.boxes = [Box(bbox=[0.25, 0.25, 0.5, 0.5], space="norm1", image=0, turn=1)]
    assert "(250,250),(500,500)" in model_turns(s, "qwenvl")[1].text


def test_the_collators_train_on_the_coordinates(tmp_path):
    from medvl.data.collate import IGNORE, VLMCollator
    from medvl.data.bundled import load_bundled
    from medvl.models.tokenizers import build_bpe_tokenizer
    s = _grounding_file(tmp_path)
    tok = build_bpe_tokenizer([t.text for x in load_bundled("vqa-rad", "test") for t in x.conversation], vocab_size=400)
    e = VLMCollator(tok, tokens_per_image=2, max_length=256).encode(s)
    learned = tok.decode([t for t, l in zip(e.input_ids, e.labels) if l != IGNORE])
    assert "(247,265),(367,497)" in learned.replace(" ", "")
