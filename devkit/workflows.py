"""UI-format workflows (what users drag into ComfyUI) from API-format prompts, and their consistency checks.

The UI format stores widget values positionally, in the order of a node's widget inputs in ``/object_info``,
with one extra value after every input that has ``control_after_generate`` (the frontend's
fixed/increment/randomize choice).
"""

from __future__ import annotations

import uuid

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def _inputs_in_order(info: dict) -> list[tuple[str, object, dict]]:
    """``(name, type, options)`` of a node's inputs in the order the frontend lays them out."""
    out = []
    for group in ("required", "optional"):
        spec = info["input"].get(group, {})
        order = info.get("input_order", {}).get(group, list(spec))
        for name in order:
            entry = spec[name]
            kind = entry[0]
            options = entry[1] if len(entry) > 1 and isinstance(entry[1], dict) else {}
            out.append((name, kind, options))
    return out


def is_widget(kind, options: dict) -> bool:
    if options.get("forceInput"):
        return False
    return isinstance(kind, list) or kind in WIDGET_TYPES


def widget_slots(info: dict) -> list[tuple[str, bool]]:
    """``(input name, has control_after_generate)`` for every widget of a node, in widgets_values order."""
    return [
        (name, bool(options.get("control_after_generate")))
        for name, kind, options in _inputs_in_order(info)
        if is_widget(kind, options)
    ]


def expected_widget_count(info: dict) -> int:
    return sum(1 + int(control) for _, control in widget_slots(info))


def api_to_ui(prompt: dict, object_info: dict) -> dict:
    """Convert an API-format prompt to a UI-format workflow laid out left to right by dependency depth."""
    ids = {key: int(key) for key in prompt}
    depth: dict[str, int] = {}

    def node_depth(key: str) -> int:
        if key not in depth:
            sources = [v[0] for v in prompt[key]["inputs"].values() if isinstance(v, list)]
            depth[key] = 1 + max((node_depth(s) for s in sources), default=-1)
        return depth[key]

    for key in prompt:
        node_depth(key)
    links = []
    nodes = {}
    rows: dict[int, int] = {}
    for order, key in enumerate(sorted(prompt, key=lambda k: (depth[k], ids[k]))):
        node = prompt[key]
        info = object_info[node["class_type"]]
        sockets, widgets = [], []
        for name, kind, options in _inputs_in_order(info):
            if is_widget(kind, options):
                value = node["inputs"].get(name, options.get("default"))
                if isinstance(value, list):  # a widget fed by a link: a socket that remembers its widget
                    sockets.append({"name": name, "type": kind, "widget": {"name": name}, "link": None})
                    value = options.get("default")
                widgets.append(value)
                if options.get("control_after_generate"):
                    widgets.append("fixed")
            else:
                sockets.append({"name": name, "type": kind, "link": None})
        outputs = [
            {"name": oname, "type": otype, "links": [], "slot_index": i}
            for i, (otype, oname) in enumerate(zip(info["output"], info["output_name"], strict=True))
        ]
        row = rows.get(depth[key], 0)
        rows[depth[key]] = row + 1
        nodes[key] = {
            "id": ids[key],
            "type": node["class_type"],
            "pos": [40 + 380 * depth[key], 60 + 260 * row],
            "size": [340, 120 + 26 * len(widgets)],
            "flags": {},
            "order": order,
            "mode": 0,
            "inputs": sockets,
            "outputs": outputs,
            "title": node.get("_meta", {}).get("title", info.get("display_name", node["class_type"])),
            "properties": {"Node name for S&R": node["class_type"]},
            "widgets_values": widgets,
        }
    for key, node in prompt.items():
        for name, value in node["inputs"].items():
            if not isinstance(value, list):
                continue
            source, slot = value[0], value[1]
            target = nodes[key]
            to_slot = next(i for i, s in enumerate(target["inputs"]) if s["name"] == name)
            link_id = len(links) + 1
            kind = nodes[source]["outputs"][slot]["type"]
            links.append([link_id, ids[source], slot, ids[key], to_slot, kind])
            target["inputs"][to_slot]["link"] = link_id
            nodes[source]["outputs"][slot]["links"].append(link_id)
    return {
        "id": str(uuid.uuid5(uuid.NAMESPACE_URL, "mixofshow:" + ",".join(sorted(prompt)) + str(len(links)))),
        "revision": 0,
        "last_node_id": max(ids.values()),
        "last_link_id": len(links),
        "nodes": [nodes[k] for k in sorted(nodes, key=lambda k: ids[k])],
        "links": links,
        "groups": [],
        "config": {},
        "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}},
        "version": 0.4,
    }


def check_ui_workflow(workflow: dict, object_info: dict) -> list[str]:
    """Problems of a UI workflow against a server's ``/object_info``: unknown nodes, widget counts, broken links."""
    problems = []
    by_id = {n["id"]: n for n in workflow["nodes"]}
    for node in workflow["nodes"]:
        info = object_info.get(node["type"])
        if info is None:
            problems.append(f"node {node['id']}: unknown type {node['type']}")
            continue
        want = expected_widget_count(info)
        if len(node.get("widgets_values", [])) != want:
            problems.append(
                f"node {node['id']} ({node['type']}): {len(node['widgets_values'])} widget values, server expects {want}"
            )
        socket_names = [name for name, kind, options in _inputs_in_order(info) if not is_widget(kind, options)]
        widget_names = {name for name, _ in widget_slots(info)}
        for slot in node.get("inputs", []):
            if slot.get("widget", {}).get("name") in widget_names:
                continue
            if slot["name"] not in socket_names:
                problems.append(f"node {node['id']} ({node['type']}): input {slot['name']} is not a socket of this node")
    for link_id, src, src_slot, dst, dst_slot, kind in workflow["links"]:
        if src not in by_id or dst not in by_id:
            problems.append(f"link {link_id}: missing node")
            continue
        out_type = object_info.get(by_id[src]["type"], {}).get("output", [None] * (src_slot + 1))[src_slot]
        if out_type != kind:
            problems.append(f"link {link_id}: type {kind} but source output is {out_type}")
        if by_id[dst]["inputs"][dst_slot].get("link") != link_id:
            problems.append(f"link {link_id}: target slot does not point back to it")
    return problems
