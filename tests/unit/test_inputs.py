"""The checks of values that arrive from ComfyUI (mostly from API clients), without a server."""

from __future__ import annotations

import math

import pytest
from comfy_api.latest import io

from mixofshow.edlora.errors import MixOfShowError, derived_seed
from mixofshow.nodes.files import plain_name_problem
from mixofshow.nodes.inputs import InvalidBoolean, boolean_normaliser, parse_boolean, widget_problem


def test_booleans_as_clients_send_them():
    assert parse_boolean(True, "x") is True and parse_boolean(False, "x") is False
    assert parse_boolean(" FALSE ", "x") is False and parse_boolean("true", "x") is True
    assert parse_boolean(["3", 0], "x") == ["3", 0], "a link is left alone"
    for value in ("maybe", "0", 1, None, "yes"):
        parsed = parse_boolean(value, "MoS Save Fused: overwrite")
        assert isinstance(parsed, InvalidBoolean)
        with pytest.raises(MixOfShowError, match=r"MoS Save Fused: overwrite must be true or false, got"):
            bool(parsed)


def test_the_prompt_handler_touches_only_boolean_inputs_of_the_pack():
    from mixofshow.nodes import all_nodes

    handler = boolean_normaliser(all_nodes())
    prompt = {
        "1": {"class_type": "MoSSaveFused", "inputs": {"overwrite": "false", "filename": "false"}},
        "2": {"class_type": "SaveImage", "inputs": {"filename_prefix": "false"}},
    }
    out = handler({"prompt": prompt})["prompt"]
    assert out["1"]["inputs"] == {"overwrite": False, "filename": "false"}
    assert out["2"]["inputs"] == {"filename_prefix": "false"}
    assert handler({"not a prompt": 1}) == {"not a prompt": 1}


def test_widget_values_against_the_schema():
    number = io.Float.Input("strength", default=1.0, min=-10.0, max=10.0)
    assert widget_problem("N", number, 10.0, {}) is None
    assert "finite" in widget_problem("N", number, math.nan, {})
    assert "finite" in widget_problem("N", number, math.inf, {})
    assert "outside the allowed range -10.0 to 10.0" in widget_problem("N", number, 10.5, {})
    integer = io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF)
    assert widget_problem("N", integer, 0xFFFFFFFFFFFFFFFF, {}) is None
    assert "an integer" in widget_problem("N", integer, 1.5, {})
    combo = io.Combo.Input("name", options=["a.pth", "b.pth"])
    assert "not a file in models/edloras (found: 'a.pth', 'b.pth')" in widget_problem("N", combo, 123, {"name": "edloras"})
    assert "is not one of 'a.pth', 'b.pth'" in widget_problem("N", combo, "c", {})


def test_output_names():
    assert plain_name_problem("my_concept") is None and plain_name_problem("potter+hermione") is None
    for name, why in [
        ("", "empty"),
        (".hidden", "dot"),
        ("a/b", "'/'"),
        ("a\x00b", "'\\x00'"),
        ("a\nb", "'\\n'"),
        (" padded", "space"),
        ("x" * 201, "201 bytes long"),
        ("é" * 101, "202 bytes long"),
    ]:
        assert why in plain_name_problem(name), name


def test_derived_seeds_wrap_like_comfyui_seeds():
    assert derived_seed(5, 1) == 6 and derived_seed(2**64 - 1, 1) == 0 and derived_seed(2**64 - 1, 3) == 2
