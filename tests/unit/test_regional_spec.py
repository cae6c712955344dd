"""Region specifications without a model: the original string syntax, boxes on feature grids, adapter strength."""

from __future__ import annotations

import pytest
import torch

from mixofshow.regional.control import parse_region_weights, scale_control, strength_map
from mixofshow.regional.spec import Box, Region, RegionError, parse_original_syntax, region_weights


def test_original_string_syntax():
    text = (
        "[a <potter1> <potter2>, in uniform]-*-[longbody, lowres]-*-[4, 6, 1024, 490]|"
        "[a <hermione1> <hermione2>]-*-[]-*-[10, 500, 1024, 1000]|[the forest]-*-[dark]-*-[]"
    )
    regions = parse_original_syntax(text, width=1024, height=1024)
    assert [r.prompt for r in regions] == ["a <potter1> <potter2>, in uniform", "a <hermione1> <hermione2>", "the forest"]
    assert regions[0].negative == "longbody, lowres" and regions[1].negative == ""
    assert regions[0].box.as_tuple() == pytest.approx((4 / 1024, 6 / 1024, 1.0, 490 / 1024))
    assert regions[2].box == Box(0.0, 0.0, 1.0, 1.0)
    with pytest.raises(RegionError, match="must look like \\[y1, x1, y2, x2\\]"):
        parse_original_syntax("[a]-*-[b]-*-[1, 2, 3]", 64, 64)
    with pytest.raises(RegionError, match=r"expected '\[prompt\]-\*-\[negative\]-\*-\[y1, x1, y2, x2\]'"):
        parse_original_syntax("[a]-*-[1, 2, 3, 4]", 64, 64)
    assert Box(0.0, 0.0, 0.5, 0.5).rasterise(4, 4).sum() == 4
    assert Box(0.1, 0.1, 0.2, 0.2).rasterise(4, 4).sum() == 0, "a box smaller than a cell covers nothing at that layer"


def test_scale_control_maps_boxes_relative_to_base_strength():
    boxes = parse_region_weights("[0, 0, 32, 32]-0.4|[0, 32, 32, 64]-1.6", width=64, height=64)
    control = {"input": [torch.ones(1, 2, 4, 4), None], "middle": [torch.ones(1, 2, 2, 2)]}
    scaled = scale_control(control, boxes, base_strength=0.8)
    grid = scaled["input"][0][0, 0]
    assert torch.allclose(grid[:2, :2], torch.full((2, 2), 0.5)) and torch.allclose(grid[:2, 2:], torch.full((2, 2), 2.0))
    assert torch.allclose(grid[2:], torch.ones(2, 4)), "outside every box the apply node's strength is kept"
    assert scaled["input"][1] is None and control["input"][0].eq(1).all(), "inputs are not modified in place"
    with pytest.raises(RegionError, match="expected '\\[y1, x1, y2, x2\\]-weight'"):
        parse_region_weights("[1, 2, 3]-0.5", 64, 64)


@pytest.mark.parametrize("size", [(4, 4), (8, 8), (16, 16), (7, 13), (64, 96)])
def test_a_box_covers_the_same_cells_for_attention_and_for_adapter_strength(size):
    height, width = size
    boxes = [Box(0.1, 0.2, 0.55, 0.9), Box(0.0, 0.0, 0.13, 0.13), Box(0.5, 0.5, 1.0, 1.0), Box(0.26, 0.01, 0.74, 0.49)]
    for box in boxes:
        attention = region_weights(Region("x", box=box), height, width) > 0
        adapter = strength_map([(box, 2.0)], 1.0, height, width) != 1.0
        assert torch.equal(attention, adapter), (box, size)
