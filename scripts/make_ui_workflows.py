"""Regenerate the UI-format twin ``workflows/<name>.json`` of every API-format ``workflows/api/<name>.json``.

The real frontend builds each file: a headless ComfyUI with this pack serves it, Chromium loads the API prompt
with ``app.loadApiJson`` (so every widget, the frontend's own "control after generate" values included, sits where
the frontend puts it), this script lays the nodes out in groups with a note that says what the workflow does, and
the frontend serialises the graph. Files carry no saved view, so the frontend fits them to the screen on open.
Run with the runtime python: ``eval "$(bash scripts/install_runtime.sh)" && $PYTHON scripts/make_ui_workflows.py``.
"""

from __future__ import annotations

import glob
import json
import os
import sys
import tempfile
import uuid
from dataclasses import dataclass, field

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.append(REPO_ROOT)

TITLE_HEIGHT = 30  # LiteGraph's node title bar, drawn above a node's pos
GROUP_TITLE = 44
GROUP_PAD = 18
NODE_GAP = 34
COLUMN_GAP = 56
BLOCK_GAP = 44
NOTE = "note"

#: Node sizes the frontend's minimum would make unreadable (prompts, previews); others take the frontend's minimum.
SIZES = {
    "CheckpointLoaderSimple": (330, 98),
    "MoSTextEncode": (400, 150),
    "CLIPTextEncode": (400, 130),
    "SaveImage": (330, 330),
    "LoadImage": (330, 360),
    "KSampler": (330, 262),
    "MoSRegionsFromText": (440, 250),
    "MoSRegionalConditioning": (420, 330),
    "MoSRegionalControlStrength": (360, 190),
    "MoSLoadTrainingImages": (420, 106),
    "MoSTrainEDLoRA": (380, 0),
    "MoSLoRAConcept": (360, 190),
    "MoSGradientFusion": (360, 0),
    "MoSEDLoRAStack": (330, 0),
    "MoSEDLoRALoader": (330, 0),
    "MoSLoadFused": (330, 0),
    "MoSSaveFused": (330, 0),
    "MoSLayoutImage": (330, 0),
    "ControlNetLoader": (330, 0),
    "ControlNetApplyAdvanced": (330, 0),
    "EmptyLatentImage": (330, 0),
    "VAEDecode": (200, 0),
}


@dataclass
class Block:
    """A column group of the layout: its title (None: no group box) and its columns of node ids, top to bottom."""

    title: str | None
    columns: list[list[str]]
    color: str = "#3f789e"


@dataclass
class Layout:
    """Rows top to bottom; each row holds stacks left to right; each stack holds blocks top to bottom."""

    note: str
    rows: list[list[list[Block]]]
    note_size: tuple[int, int] = (360, 300)
    sizes: dict[str, tuple[int, int]] = field(default_factory=dict)  # per node id, overriding SIZES


def _single_concept_rows(model_title: str) -> list:
    """Note | model and concept | prompts | sample and save (the single-concept workflows, SD1.x and SDXL)."""
    return [
        [
            [Block(None, [[NOTE]])],
            [Block(model_title, [["1", "2"]], "#3f789e")],
            [Block("2  Prompts", [["3", "4", "5"]], "#8a6e2f")],
            [Block("3  Sample and save", [["6", "7"], ["8"]], "#4f7a3a")],
        ]
    ]


#: node sizes of the fuse-then-one-character-per-region workflows (SD1.x and SDXL)
FUSE_LORAS_REGIONAL_SIZES = {
    "2": (340, 150),
    "3": (340, 150),
    "4": (340, 150),
    "6": (400, 220),
    "7": (380, 300),
    "11": (280, 260),
}


def _fuse_loras_regional_rows() -> list:
    """Base model | characters | fuse, then one character per region and sampling below."""
    return [
        [
            [Block(None, [[NOTE]]), Block("1  Base model", [["1"]], "#3f789e")],
            [Block("2  Characters", [["2", "3", "4"]], "#8a6e2f")],
            [Block("3  Fuse", [["5"]], "#a1309b")],
        ],
        [
            [Block("4  One character per region, then sample", [["6", "8"], ["7"], ["9", "10"], ["11"]], "#4f7a3a")],
        ],
    ]


LAYOUTS = {
    "edlora_single_concept": Layout(
        note=(
            "## ED-LoRA: one concept\n"
            "Loads an ED-LoRA (original `.pth` or this pack's `.safetensors`) and prompts its concept words, "
            "e.g. `<potter1> <potter2>`.\n\n"
            "**Files:** an SD1.x checkpoint in `models/checkpoints`; an ED-LoRA in `models/edloras`.\n\n"
            "MoS Text Encode gives every cross-attention layer its own concept vectors; the negative is a plain prompt."
        ),
        rows=_single_concept_rows("1  Model and concept"),
    ),
    "gradient_fusion_three_concepts": Layout(
        note=(
            "## Gradient fusion of three ED-LoRAs\n"
            "Fuses several ED-LoRAs into one model that knows every concept (Mix-of-Show gradient fusion), saves it "
            "to `models/mixofshow_fused`, and samples all three concepts in one prompt.\n\n"
            "**Files:** an SD1.x checkpoint; three ED-LoRAs in `models/edloras`.\n\n"
            "Fusion takes minutes on a GPU; the seed is fixed so a second Run reuses the result."
        ),
        note_size=(330, 290),
        rows=[
            [
                [Block(None, [[NOTE]]), Block("1  Base model and concepts", [["1", "2", "3", "4"]], "#3f789e")],
                [Block("2  Fuse and save", [["5", "6"]], "#a1309b")],
                [Block("3  Sample the fused model", [["7", "8", "9"], ["10", "11", "12"]], "#4f7a3a")],
            ],
        ],
    ),
    "fuse_loras_regional": Layout(
        note=(
            "## Three characters from their own LoRAs\n"
            "Fuses ordinary LoRAs (kohya, LyCORIS, diffusers: whatever LoraLoader reads) into one model with "
            "Mix-of-Show gradient fusion, then gives each character its own region and prompt, so their identities "
            "do not bleed into each other.\n\n"
            "**Files:** an SD1.x checkpoint; three character LoRAs in `models/loras`. Write prompts with each "
            "LoRA's trigger words (or leave them empty to use the file's training tags).\n\n"
            "Fusion takes minutes on a GPU; the seed is fixed so a second Run reuses it."
        ),
        note_size=(340, 290),
        sizes=FUSE_LORAS_REGIONAL_SIZES,
        rows=_fuse_loras_regional_rows(),
    ),
    "regional_three_concepts_sketch": Layout(
        note=(
            "## Regional sampling with a sketch\n"
            "Composes three fused concepts in one image: each box of *Regions* has its own prompt and negative "
            "(original Mix-of-Show syntax, pixel boxes `[top, left, bottom, right]` of a 1024x512 image); a drawn "
            "sketch guides the layout through a T2I-Adapter or ControlNet, stronger inside two boxes.\n\n"
            "**Files:** the base SD1.x checkpoint; a fused model in `models/mixofshow_fused` (from the fusion "
            "workflow); a sketch in `input/`; a sketch T2I-Adapter or ControlNet in `models/controlnet`."
        ),
        note_size=(360, 330),
        rows=[
            [
                [Block(None, [[NOTE]])],
                [Block("1  Fused model and regions", [["1", "2"], ["3"], ["4"]], "#3f789e")],
            ],
            [
                [Block("2  Layout from a sketch", [["5"], ["6", "7"], ["8", "9"]], "#8a6e2f")],
                [Block("3  Sample and save", [["10", "11", "12"], ["13"]], "#4f7a3a")],
            ],
        ],
    ),
    "sdxl_edlora_single_concept": Layout(
        note=(
            "## SDXL: one ED-LoRA concept\n"
            "The single-concept workflow on an SDXL-family checkpoint (SDXL base, Pony, Illustrious, NoobAI...). "
            "An SDXL ED-LoRA holds concept vectors for both text encoders and one vector per spatial transformer "
            "(11 layers); train one with MoS Train ED-LoRA on an SDXL checkpoint.\n\n"
            "**Files:** an SDXL checkpoint in `models/checkpoints`; an SDXL ED-LoRA in `models/edloras`.\n\n"
            "An SD1.x ED-LoRA is refused on SDXL by name (and the reverse)."
        ),
        rows=_single_concept_rows("1  SDXL model and concept"),
    ),
    "sdxl_fuse_loras_regional": Layout(
        note=(
            "## SDXL: three characters, fused, one per region\n"
            "Fuses two ordinary SDXL LoRAs and one SDXL ED-LoRA into one model with Mix-of-Show gradient fusion "
            "(both text encoders, the 2048-wide keys and values, the spatial layers), then gives each character its "
            "own region, prompt and negative. The pooled prompt that conditions the whole image stays the global "
            "one.\n\n"
            "**Files:** an SDXL checkpoint; two SDXL LoRAs in `models/loras`; an SDXL ED-LoRA in `models/edloras`.\n\n"
            "Fusion samples at 1024 (resolution 0 = the model's own) and takes minutes on a GPU; the seed is fixed "
            "so a second Run reuses it."
        ),
        note_size=(340, 330),
        sizes=FUSE_LORAS_REGIONAL_SIZES,
        rows=_fuse_loras_regional_rows(),
    ),
    "train_edlora_from_folder": Layout(
        note=(
            "## Train an ED-LoRA from a folder\n"
            "Learns a new concept from 5-20 photos and samples it right away. Put the photos in "
            "`input/mixofshow_concept` (optionally with `mask/` and `caption/` subfolders, as in the original "
            "datasets, or `photo.txt` captions beside each photo).\n\n"
            "**Files:** an SD1.x checkpoint. The result is saved to `models/edloras/my_concept.safetensors`.\n\n"
            "Training needs a GPU for real use; the seed is fixed so a second Run does not retrain."
        ),
        note_size=(420, 330),
        rows=[
            [
                [Block(None, [[NOTE]]), Block("1  Base model and photos", [["1", "2"]], "#3f789e")],
                [Block("2  Train", [["3"]], "#a1309b")],
                [Block("3  Sample the new concept", [["4", "5", "6"], ["7", "8", "9"]], "#4f7a3a")],
            ]
        ],
    ),
}

_BUILD = """async ([api, name, note]) => {
  app.graph.clear();
  await app.loadApiJson(api, name);
  for (const node of app.graph._nodes)
    for (const w of node.widgets || []) if (w.name === 'control_after_generate') w.value = 'fixed';
  const n = LiteGraph.createNode('MarkdownNote');
  n.widgets[0].value = note;
  app.graph.add(n);
  return {note_id: n.id, minimum: Object.fromEntries(app.graph._nodes.map((x) => [String(x.id), Array.from(x.computeSize())])),
          workflow: JSON.stringify(app.graph.serialize())};
}"""


def place(layout: Layout, types: dict[str, str], minimum: dict[str, list[float]]) -> tuple[dict, list[dict]]:
    """Positions and sizes per node id, and the group boxes, from the layout and the frontend's minimum sizes."""

    def size(node: str) -> tuple[float, float]:
        want = layout.note_size if node == NOTE else layout.sizes.get(node, SIZES.get(types[node], (0, 0)))
        low = minimum[node]
        return max(want[0], low[0]), max(want[1], low[1])

    boxes: dict[str, tuple[float, float, float, float]] = {}
    groups = []

    def place_block(block: Block, left: float, top: float) -> tuple[float, float]:
        """Lay ``block`` out from its top-left corner; returns its right and bottom edges."""
        pad = GROUP_PAD if block.title else 0
        x = left + pad
        bottom = top
        for column in block.columns:
            width = max(size(n)[0] for n in column)
            y = top + (GROUP_TITLE if block.title else 0) + pad
            for node in column:
                w, h = size(node)
                boxes[node] = (x, y + TITLE_HEIGHT, width, h)
                y += TITLE_HEIGHT + h + NODE_GAP
            bottom = max(bottom, y - NODE_GAP + pad)
            x += width + COLUMN_GAP
        right = x - COLUMN_GAP + pad
        if block.title:
            groups.append({"title": block.title, "bounding": [left, top, right - left, bottom - top], "color": block.color})
        return right, bottom

    top = 0.0
    for row in layout.rows:
        left = 0.0
        row_bottom = top
        for stack in row:
            y = top
            stack_right = left
            for block in stack:
                right, bottom = place_block(block, left, y)
                stack_right = max(stack_right, right)
                y = bottom + BLOCK_GAP
            row_bottom = max(row_bottom, y - BLOCK_GAP)
            left = stack_right + BLOCK_GAP
        top = row_bottom + BLOCK_GAP
    return boxes, groups


def build(frontend, name: str, api: dict, layout: Layout) -> dict:
    built = frontend.evaluate(_BUILD, [api, name, layout.note])
    workflow = json.loads(built["workflow"])
    note_id = str(built["note_id"])
    types = {str(n["id"]): n["type"] for n in workflow["nodes"]}
    minimum = dict(built["minimum"])
    minimum[NOTE] = minimum.pop(note_id)
    types[NOTE] = "MarkdownNote"
    placed = [n for row in layout.rows for stack in row for block in stack for column in block.columns for n in column]
    if sorted(placed) != sorted([*api, NOTE]):
        raise SystemExit(f"{name}: the layout places {sorted(placed)} but the workflow has {sorted([*api, NOTE])}")
    boxes, groups = place(layout, types, minimum)
    for node in workflow["nodes"]:
        key = NOTE if str(node["id"]) == note_id else str(node["id"])
        x, y, w, h = boxes[key]
        node["pos"] = [round(x), round(y)]
        node["size"] = [round(w), round(h)]
    workflow["groups"] = [
        {
            "id": i + 1,
            "title": g["title"],
            "bounding": [round(v) for v in g["bounding"]],
            "color": g["color"],
            "font_size": 24,
            "flags": {},
        }
        for i, g in enumerate(groups)
    ]
    workflow["extra"] = {k: v for k, v in workflow.get("extra", {}).items() if k != "ds"}  # no saved view: fit on open
    workflow["id"] = str(uuid.uuid5(uuid.NAMESPACE_URL, f"mixofshow/workflows/{name}"))  # the frontend wants a UUID
    return workflow


def main() -> int:
    from devkit.bootstrap import comfyui_dir
    from devkit.browser import Frontend
    from devkit.server import ComfyServer

    built = []
    with tempfile.TemporaryDirectory() as base, ComfyServer(comfyui_dir(), base) as server, Frontend(server.url) as frontend:
        for api_path in sorted(glob.glob(os.path.join(REPO_ROOT, "workflows", "api", "*.json"))):
            name = os.path.splitext(os.path.basename(api_path))[0]
            if name not in LAYOUTS:
                print(f"{name}: no layout in scripts/make_ui_workflows.py", file=sys.stderr)
                return 1
            with open(api_path) as f:
                api = json.load(f)
            workflow = build(frontend, name, api, LAYOUTS[name])
            ui_path = os.path.join(REPO_ROOT, "workflows", f"{name}.json")
            with open(ui_path, "w") as f:
                json.dump(workflow, f, indent=1)
                f.write("\n")
            print(f"wrote {os.path.relpath(ui_path, REPO_ROOT)}")
            built.append((name, workflow))
        errors = frontend.real_errors()
        if errors:
            print("\n".join(errors), file=sys.stderr)
            return 1
        frontend.close()
        # pictures for the README: a larger screen, so the fitted view is close to full size and every label reads
        with Frontend(server.url, 2400, 1350) as big:
            for name, workflow in built:
                picture = os.path.join(REPO_ROOT, "docs", "images", f"{name}.jpg")
                os.makedirs(os.path.dirname(picture), exist_ok=True)
                big.drop_workflow(workflow, f"{name}.json")
                big.dismiss_toasts()
                big.page.screenshot(path=picture, clip=big.canvas_clip(), type="jpeg", quality=82)
                print(f"wrote {os.path.relpath(picture, REPO_ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
