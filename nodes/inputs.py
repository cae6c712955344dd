"""One check of every widget value a MoS node receives, derived from the node's own schema.

ComfyUI 0.3.75 leaves gaps for V3 nodes that clients (the HTTP API in particular) fall into: combo values are not
checked at all, ``"nan"`` passes as a FLOAT (every comparison with NaN is false, so min/max never trip), and a
BOOLEAN is converted with Python's ``bool()``, so the string ``"false"`` becomes True. This module closes them:

* :class:`MoSNode` is the base of every node of the pack. Its ``validate_inputs`` checks each widget value
  against the schema (INT/FLOAT in range and finite, combo values among the options, text is text) and answers
  with a message that names the node, the input and what is allowed; ComfyUI then refuses the prompt with HTTP 400
  before anything runs.
* :func:`normalise_booleans` runs on every submitted prompt (an on-prompt handler, before ComfyUI's conversion):
  ``true``/``false`` JSON values pass, the strings ``"true"``/``"false"`` (any case) become booleans, and any other
  value becomes :class:`InvalidBoolean`, which ComfyUI's own conversion then reports as an invalid input naming it.
"""

from __future__ import annotations

import math

from comfy_api.latest import io

from ..edlora.arch import require_supported
from ..edlora.errors import MixOfShowError


class InvalidBoolean(str):
    """A submitted BOOLEAN value that is neither true nor false: serialisable as text (ComfyUI echoes it in its
    error), but turning it into a boolean raises the message that names the input."""

    def __new__(cls, value, message: str):
        text = super().__new__(cls, repr(value))
        text.message = message
        return text

    def __bool__(self) -> bool:
        raise MixOfShowError(self.message)


def parse_boolean(value, what: str):
    """``value`` as ComfyUI should have read it: a bool, a link (left alone), or an :class:`InvalidBoolean`."""
    if isinstance(value, bool) or isinstance(value, list):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    return InvalidBoolean(value, f"{what} must be true or false, got {value!r}.")


def _boolean_inputs(nodes) -> dict[str, tuple[str, set[str]]]:
    out = {}
    for node in nodes:
        schema = node.define_schema()
        names = {i.id for i in schema.inputs if isinstance(i, io.Boolean.Input)}
        if names:
            out[schema.node_id] = (schema.display_name or schema.node_id, names)
    return out


def boolean_normaliser(nodes):
    """An on-prompt handler for ``PromptServer.add_on_prompt_handler`` covering the BOOLEAN inputs of ``nodes``."""
    table = _boolean_inputs(nodes)

    def normalise_booleans(json_data):
        prompt = json_data.get("prompt") if isinstance(json_data, dict) else None
        if not isinstance(prompt, dict):
            return json_data
        for node in prompt.values():
            if not isinstance(node, dict) or node.get("class_type") not in table or not isinstance(node.get("inputs"), dict):
                continue
            title, names = table[node["class_type"]]
            for name in names & node["inputs"].keys():
                node["inputs"][name] = parse_boolean(node["inputs"][name], f"{title}: {name}")
        return json_data

    return normalise_booleans


def _options_text(options: list, limit: int = 12) -> str:
    shown = ", ".join(repr(o) for o in options[:limit])
    more = f" and {len(options) - limit} more" if len(options) > limit else ""
    return (shown + more) if options else "none"


def widget_problem(node_title: str, spec, value, file_folders: dict[str, str]) -> str | None:
    """Why ``value`` is not acceptable for the widget ``spec`` of a node, or None."""
    name = spec.id
    where = f"{node_title}: {name}"
    if isinstance(spec, io.Boolean.Input):
        return None if isinstance(value, bool) else f"{where} must be true or false, got {value!r}."
    if isinstance(spec, (io.Int.Input, io.Float.Input)):
        is_int = isinstance(spec, io.Int.Input)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (is_int and not isinstance(value, int)):
            return f"{where} must be {'an integer' if is_int else 'a number'}, got {value!r}."
        if not math.isfinite(value):
            return f"{where} must be a finite number, got {value!r}."
        low, high = spec.min, spec.max
        if (low is not None and value < low) or (high is not None and value > high):
            return f"{where} = {value!r} is outside the allowed range {low} to {high}."
        return None
    if isinstance(spec, io.Combo.Input):
        options = list(spec.options or [])
        if value in options:
            return None
        if name in file_folders:
            return f"{where}: {value!r} is not a file in models/{file_folders[name]} (found: {_options_text(options)})."
        return f"{where}: {value!r} is not one of {_options_text(options)}."
    if isinstance(spec, io.String.Input):
        return None if isinstance(value, str) else f"{where} must be text, got {value!r}."
    return None


class MoSNode(io.ComfyNode):
    """Base of every node of the pack: checks widget values against the node's schema at validation time."""

    #: widget name -> models folder, for combo inputs that list files (better messages)
    FILE_INPUTS: dict[str, str] = {}

    @classmethod
    def require_supported(cls, model=None, clip=None) -> None:
        """Refuse, naming this node, a MODEL or CLIP of a family the pack does not handle (Flux, SD3...)."""
        schema = cls.define_schema()
        require_supported(model, clip, schema.display_name or schema.node_id)

    @classmethod
    def validate_inputs(cls, **values):
        schema = cls.define_schema()
        title = schema.display_name or schema.node_id
        for spec in schema.inputs:
            if spec.id in values and values[spec.id] is not None:
                problem = widget_problem(title, spec, values[spec.id], cls.FILE_INPUTS)
                if problem is not None:
                    return problem
        return True
