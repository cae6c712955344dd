"""Regenerate the UI-format twin ``workflows/<name>.json`` of every API-format ``workflows/api/<name>.json``.

Starts a headless ComfyUI with this pack to read ``/object_info`` (widget order), converts, and stops it.
Run with the runtime python: ``eval "$(bash scripts/install_runtime.sh)" && $PYTHON scripts/make_ui_workflows.py``.
"""

from __future__ import annotations

import glob
import json
import os
import sys
import tempfile

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.append(REPO_ROOT)


def main() -> int:
    from devkit.bootstrap import comfyui_dir
    from devkit.server import ComfyServer
    from devkit.workflows import api_to_ui, check_ui_workflow

    with tempfile.TemporaryDirectory() as base, ComfyServer(comfyui_dir(), base) as server:
        object_info = server.get("/object_info")
    for api_path in sorted(glob.glob(os.path.join(REPO_ROOT, "workflows", "api", "*.json"))):
        with open(api_path) as f:
            prompt = json.load(f)
        workflow = api_to_ui(prompt, object_info)
        problems = check_ui_workflow(workflow, object_info)
        if problems:
            print("\n".join(problems), file=sys.stderr)
            return 1
        ui_path = os.path.join(REPO_ROOT, "workflows", os.path.basename(api_path))
        with open(ui_path, "w") as f:
            json.dump(workflow, f, indent=1)
            f.write("\n")
        print(f"wrote {os.path.relpath(ui_path, REPO_ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
