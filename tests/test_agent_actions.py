"""The computer_use action schema: parsing calls and boxes, [0, 1000) bins to pixels, constrained decoding."""

import json

import pytest

from qwen2vl.agent.actions import COMPUTER_USE, Action, ActionError, action_from_call, action_from_text
from qwen2vl.agent.grounding import denormalize, normalize
from qwen2vl.agent.tools import format_call


def test_click_call_to_pixels_at_bin_centres():
    action = action_from_text(format_call("computer_use", {"action": "click", "coordinate": [156, 999]}))
    assert action == Action("click", point=(156, 999))
    # the exact conversions of grounding.py: bin centre, and back to the same bin
    x, y = action.pixels((640, 480))
    assert (x, y) == (156.5 * 640 / 1000, 999.5 * 480 / 1000)
    assert (normalize(x, 640), normalize(y, 480)) == (156, 999)


def test_qwen_format_call():
    text = '✿FUNCTION✿: computer_use\n✿ARGS✿: {"action": "type", "text": "hello"}'
    assert action_from_text(text, "qwen") == Action("type", text="hello")


@pytest.mark.parametrize("target", ["<|box_start|>(100,200),(300,401)<|box_end|>", [100, 200, 300, 401]])
def test_box_targets_click_their_centre(target):
    action = action_from_call({"action": "click", "coordinate": target})
    assert action.point == (200, 300.5)
    x, y = action.pixels((1000, 1000))
    assert x == 200.5 and y == (denormalize(300, 1000) + denormalize(301, 1000)) / 2 == 301.0


def test_reply_with_only_a_grounding_box_is_a_click():
    reply = "<|object_ref_start|>OK<|object_ref_end|><|box_start|>(10,20),(30,40)<|box_end|>"
    assert action_from_text(reply) == Action("click", point=(20, 30))


def test_every_action_round_trips_through_its_call():
    actions = [Action("click", point=(1, 2)), Action("double_click", point=(3, 4)),
               Action("long_press", point=(5, 6), seconds=2.0), Action("type", text="abc"),
               Action("key", key="ctrl+a"), Action("scroll", point=(500, 500), direction="up"),
               Action("drag", point=(1, 1), point2=(900, 900)), Action("wait", seconds=0.5),
               Action("answer", text="42"), Action("terminate", status="failure")]
    for action in actions:
        assert action_from_call(json.loads(json.dumps(action.call_arguments()))) == action
    assert {a.kind for a in actions} == set(COMPUTER_USE["function"]["parameters"]["properties"]["action"]["enum"])


@pytest.mark.parametrize("arguments, message", [
    ({"action": "fly"}, "action 'fly' is not one of"),
    ({"action": "click"}, "click needs a coordinate"),
    ({"action": "click", "coordinate": [1000, 5]}, "1000 is not an integer in \\[0, 1000\\)"),
    ({"action": "click", "coordinate": [1.5, 5]}, "1.5 is not an integer"),
    ({"action": "click", "coordinate": [1, 2, 3]}, "must be \\[x, y\\] or a box"),
    ({"action": "drag", "coordinate": [1, 2]}, "drag needs coordinate2"),
    ({"action": "type"}, "type needs a text string"),
    ({"action": "scroll", "coordinate": [1, 2], "direction": "sideways"}, "scroll direction"),
    ({"action": "wait", "time": 99}, "time must be a number of seconds in \\[0, 30.0\\]"),
])
def test_bad_arguments_name_the_field(arguments, message):
    with pytest.raises(ActionError, match=message):
        action_from_call(arguments)


def test_format_errors():
    with pytest.raises(ActionError, match="no computer_use call and no grounding box"):
        action_from_text("I would click the button.")
    with pytest.raises(ActionError, match="no computer_use call \\(got search\\)"):
        action_from_text(format_call("search", {"q": "x"}))


def test_constrained_decoding_gives_a_valid_call():
    from qwen2vl.agent.constraint import ToolCallConstraint
    from qwen2vl.agent.tools import tools_block
    from qwen2vl.generation.cli import EMBEDDED_MODEL
    from qwen2vl.generation.engine import Engine

    engine = Engine.from_pretrained(EMBEDDED_MODEL, dtype="float32", device="cpu")
    conv = [{"role": "system", "content": tools_block([COMPUTER_USE])},
            {"role": "user", "content": "Click on the OK button."}]
    result = engine.generate(conv, max_new_tokens=120, constraint=ToolCallConstraint(engine.tokenizer, COMPUTER_USE,
                                                                                     ["click"]))[0]
    action = action_from_text(result.text)
    assert action.kind == "click" and result.finish_reason == "stop"
