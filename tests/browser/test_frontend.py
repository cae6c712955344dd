"""Every shipped UI workflow dropped onto the real ComfyUI frontend: what Run would send, how it opens."""

from __future__ import annotations

import copy
import json
import os

import pytest

from mixofshow.devkit.server import TEST_CHECKPOINT

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "workflows")
WORKFLOWS = {f: os.path.join(ROOT, f) for f in sorted(os.listdir(ROOT)) if f.endswith(".json")}
NOTE_TYPES = ("Note", "MarkdownNote")


def api_twin(name: str) -> dict:
    with open(os.path.join(os.path.dirname(WORKFLOWS[name]), "api", name)) as f:
        return json.load(f)


def prompt_differences(expected: dict, sent: dict) -> list[str]:
    """Where the prompt the frontend would send differs from the API-format twin (node ids, types, inputs)."""
    problems = [f"node {k} missing from what Run sends" for k in sorted(set(expected) - set(sent))]
    problems += [f"node {k} sent but not in the API twin" for k in sorted(set(sent) - set(expected))]
    for key in sorted(set(expected) & set(sent)):
        want, got = expected[key], sent[key]
        if want["class_type"] != got["class_type"]:
            problems.append(f"node {key}: type {got['class_type']}, expected {want['class_type']}")
            continue
        for name in sorted(set(want["inputs"]) | set(got["inputs"])):
            a, b = want["inputs"].get(name), got["inputs"].get(name)
            if a != b:
                problems.append(f"node {key} ({want['class_type']}).{name}: Run sends {b!r}, the API twin has {a!r}")
    return problems


_dropped: dict[str, dict] = {}


def dropped(frontend, name: str) -> dict:
    """The frontend's state after a user drops ``name`` onto the canvas (dropped once per session)."""
    if name not in _dropped:
        mark = frontend.mark()
        with open(WORKFLOWS[name]) as f:
            state = frontend.drop_file(f.read(), name)
        state["new_errors"] = frontend.real_errors(mark)
        _dropped[name] = state
    return _dropped[name]


def intersects(a, b) -> bool:
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    return ax < bx + bw and bx < ax + aw and ay < by + bh and by < ay + ah


@pytest.mark.parametrize("name", sorted(WORKFLOWS))
def test_run_sends_exactly_the_api_twin(frontend, name):
    state = dropped(frontend, name)
    assert state["missing"] == [], f"{name}: missing node types {state['missing']}"
    assert state["dialog"] == [], f"{name}: the missing-nodes dialog opened: {state['dialog']}"
    assert [n["type"] for n in state["nodes"] if n["has_errors"]] == []
    assert state["new_errors"] == [], f"{name}: the page reported errors {state['new_errors']}"
    assert prompt_differences(api_twin(name), state["prompt"]) == []


@pytest.mark.parametrize("name", sorted(WORKFLOWS))
def test_opens_fitted_readable_and_without_overlaps(frontend, name):
    state = dropped(frontend, name)
    assert not state["low_quality"], f"{name} opens at zoom {state['scale']:.2f}, where the frontend stops drawing text"
    left, top, width, height = state["canvas_rect"]
    scale, (ox, oy) = state["scale"], state["offset"]
    for node in state["nodes"]:
        x, y, w, h = node["bounding"]
        screen = (left + (x + ox) * scale, top + (y + oy) * scale, w * scale, h * scale)
        assert screen[0] >= left and screen[1] >= top, f"{name}: {node['title']} starts off-screen at {screen[:2]}"
        assert screen[0] + screen[2] <= left + width and screen[1] + screen[3] <= top + height, (
            f"{name}: {node['title']} ends off-screen ({screen}) on a {width:.0f}x{height:.0f} canvas"
        )
    boxes = [(n["title"], n["bounding"]) for n in state["nodes"]]
    overlaps = [(a, b) for i, (a, ra) in enumerate(boxes) for b, rb in boxes[i + 1 :] if intersects(ra, rb)]
    assert overlaps == [], f"{name}: nodes cover each other: {overlaps}"
    groups = [(g["title"], g["bounding"]) for g in state["groups"]]
    assert [(a, b) for i, (a, ra) in enumerate(groups) for b, rb in groups[i + 1 :] if intersects(ra, rb)] == []
    notes = [n for n in state["nodes"] if n["type"] in NOTE_TYPES]
    assert notes and all(len(str(n["widgets"][0][1])) > 80 for n in notes), f"{name} needs a note saying what it does"


def test_a_widget_value_moved_by_one_is_caught(frontend):
    """The defect the first shipped files had: no 'control after generate' value after a seed."""
    name = "gradient_fusion_three_concepts.json"
    with open(WORKFLOWS[name]) as f:
        workflow = json.load(f)
    shifted = copy.deepcopy(workflow)
    fusion = next(n for n in shifted["nodes"] if n["type"] == "MoSGradientFusion")
    seed_at = 4
    assert fusion["widgets_values"][seed_at + 1] == "fixed"
    del fusion["widgets_values"][seed_at + 1]
    fusion["widgets_values"].append("padded")
    state = frontend.drop_workflow(shifted, "shifted_" + name)
    problems = prompt_differences(api_twin(name), state["prompt"])
    assert any(".solver: Run sends 'auto'" in p for p in problems), problems
    assert any(".device: Run sends 'padded'" in p for p in problems), problems


def test_new_nodes_of_the_pack_start_with_a_fixed_seed(frontend):
    controls = frontend.evaluate(
        """() => Object.fromEntries(['MoSGradientFusion', 'MoSTrainEDLoRA', 'KSampler'].map((type) => {
             const node = LiteGraph.createNode(type);
             return [type, node.widgets.find((w) => w.name === 'control_after_generate')?.value];
           }))"""
    )
    # ours: a new seed would mean minutes of fusion or training again; core nodes keep the frontend's default
    assert controls == {"MoSGradientFusion": "fixed", "MoSTrainEDLoRA": "fixed", "KSampler": "randomize"}


def test_the_run_button_renders_the_single_concept_workflow(frontend, server):
    name = "edlora_single_concept.json"
    with open(WORKFLOWS[name]) as f:
        workflow = json.load(f)
    values = {
        "CheckpointLoaderSimple": {"ckpt_name": TEST_CHECKPOINT},
        "EmptyLatentImage": {"width": 128, "height": 128},
        "KSampler": {"steps": 2},
    }
    frontend.drop_workflow(workflow, "run_" + name)
    frontend.evaluate(
        """(values) => { for (const node of app.graph._nodes) for (const [name, value] of Object.entries(values[node.type] || {}))
             node.widgets.find((w) => w.name === name).value = value; }""",
        values,
    )
    with frontend.page.expect_response(lambda r: r.url.endswith("/api/prompt") and r.request.method == "POST") as response:
        frontend.page.click('[data-testid="queue-button"]')
    answer = response.value.json()
    assert answer.get("node_errors") == {}, answer
    entry = server.wait(answer["prompt_id"])
    images = server.image_files(entry)
    assert len(images) == 1 and os.path.getsize(images[0]) > 1000


def test_the_page_starts_without_errors_and_loads_the_packs_extension(frontend):
    assert frontend.real_errors() == []
    assert "mixofshow.fixedSeeds" in frontend.evaluate("() => app.extensions.map((e) => e.name)")
