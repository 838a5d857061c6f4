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
