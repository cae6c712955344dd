"""Start a real headless ComfyUI with this pack, queue API-format workflows, read results, stop it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACK_DIR_NAME = "mixofshow"
#: The small SD1.x checkpoint the test server finds in its models/checkpoints (written by the tests' fixture).
TEST_CHECKPOINT = "mos-test-small-sd1.safetensors"
#: The small SDXL checkpoint beside it (SDXL's layout at 320 channels, full CLIP-L and CLIP-G).
TEST_SDXL_CHECKPOINT = "mos-test-small-sdxl.safetensors"


class ComfyServerError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare_base_dir(base_dir: str) -> str:
    """Create a ComfyUI ``--base-directory`` whose custom_nodes holds a link to this repository."""
    custom_nodes = os.path.join(base_dir, "custom_nodes")
    os.makedirs(custom_nodes, exist_ok=True)
    for sub in ("checkpoints", "edloras", "loras", "controlnet"):
        os.makedirs(os.path.join(base_dir, "models", sub), exist_ok=True)
    link = os.path.join(custom_nodes, PACK_DIR_NAME)
    if not os.path.lexists(link):
        os.symlink(REPO_ROOT, link, target_is_directory=True)
    return base_dir


class ComfyServer:
    """A ComfyUI server process on 127.0.0.1 that this object started and will stop."""

    def __init__(self, comfyui_dir: str, base_dir: str, python: str = sys.executable, port: int | None = None):
        self.comfyui_dir = comfyui_dir
        self.base_dir = prepare_base_dir(base_dir)
        self.python = python
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = os.path.join(base_dir, "comfyui.log")
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 180.0) -> ComfyServer:
        command = [
            self.python,
            os.path.join(self.comfyui_dir, "main.py"),
            "--cpu",
            "--listen",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--base-directory",
            self.base_dir,
            "--database-url",
            "sqlite:///:memory:",
            "--disable-api-nodes",
            "--dont-print-server",
        ]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        log = open(self.log_path, "w")
        self.process = subprocess.Popen(
            command, cwd=self.comfyui_dir, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ComfyServerError(f"ComfyUI exited with {self.process.returncode} during start:\n{self.log_tail()}")
            try:
                self.get("/system_stats")
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        self.stop()
        raise ComfyServerError(f"ComfyUI did not answer within {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=20)
        except ProcessLookupError:
            pass

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def log_text(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as response:
            return json.loads(response.read())

    def get_bytes(self, path: str) -> bytes:
        with urllib.request.urlopen(self.url + path, timeout=30) as response:
            return response.read()

    def queue(self, prompt: dict) -> str:
        """POST an API-format prompt; returns its prompt_id. Validation errors raise with ComfyUI's node_errors."""
        body = json.dumps({"prompt": prompt, "client_id": "mixofshow-devkit"}).encode()
        request = urllib.request.Request(self.url + "/prompt", data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return json.loads(response.read())["prompt_id"]
        except urllib.error.HTTPError as exc:
            raise ComfyServerError(f"POST /prompt refused ({exc.code}): {exc.read().decode(errors='replace')}") from None

    def wait(self, prompt_id: str, timeout: float = 600.0) -> dict:
        """The /history entry of ``prompt_id`` once it completed; an execution error raises with its message."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            history = self.get(f"/history/{prompt_id}")
            entry = history.get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None:
                status = entry["status"]
                if status.get("status_str") == "error":
                    messages = [m for m in status.get("messages", []) if m[0] == "execution_error"]
                    detail = messages[0][1] if messages else status
                    raise ComfyServerError(f"Prompt {prompt_id} failed: {json.dumps(detail)[:3000]}")
                return entry
            if self.process is not None and self.process.poll() is not None:
                raise ComfyServerError(f"ComfyUI exited while running the prompt:\n{self.log_tail()}")
            time.sleep(0.5)
        raise ComfyServerError(f"Prompt {prompt_id} did not finish within {timeout:.0f} s:\n{self.log_tail()}")

    def run(self, prompt: dict, timeout: float = 600.0) -> dict:
        return self.wait(self.queue(prompt), timeout)

    def image_files(self, entry: dict) -> list[str]:
        """Paths on disk of the images a finished prompt saved to the output folder."""
        paths = []
        for output in entry.get("outputs", {}).values():
            for image in output.get("images", []):
                if image.get("type") == "output":
                    paths.append(os.path.join(self.base_dir, "output", image.get("subfolder", ""), image["filename"]))
        return paths


def load_workflow(name: str) -> dict:
    """The API-format twin ``workflows/api/<name>.json`` of a shipped workflow."""
    with open(os.path.join(REPO_ROOT, "workflows", "api", f"{name}.json")) as f:
        return json.load(f)


def set_inputs(prompt: dict, class_type: str, **values) -> dict:
    """Set widget values on every node of ``class_type`` in an API-format prompt (which must have one)."""
    found = [node for node in prompt.values() if node["class_type"] == class_type]
    if not found:
        raise KeyError(f"workflow has no {class_type} node")
    for node in found:
        node["inputs"].update(values)
    return prompt
