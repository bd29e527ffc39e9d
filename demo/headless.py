"""Run workflows through ComfyUI's real executor, in-process or through a real server subprocess.

In-process (:func:`setup_comfyui` then :func:`run_prompt`): ComfyUI's own node registry, its own custom-node
loader for this pack, ``execution.validate_prompt`` and ``execution.PromptExecutor`` with a minimal server
stub. Server (:class:`ComfyServer`): ``main.py`` on 127.0.0.1 with a free port, CPU flags, an in-memory
database and an ``extra_model_paths.yaml``; ``POST /prompt`` and ``/history`` over HTTP.
"""
from __future__ import annotations

import asyncio
import json
import logging
import hashlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from ..comfy_path import find_comfyui

PACK_ROOT = Path(__file__).resolve().parent.parent
PACK_NAME = "instantfamily_nodes"
CPU_SERVER_FLAGS = ("--cpu", "--use-pytorch-cross-attention", "--disable-api-nodes",
                    "--database-url", "sqlite:///:memory:")


class WorkflowError(RuntimeError):
    """A workflow that ComfyUI refused or that failed while running; the message names the node."""


def pack_custom_nodes_dir() -> Path:
    """A folder holding the pack under its own name, as ComfyUI's custom-node loader wants it: the parent
    folder when the pack already sits in ``.../instantfamily_nodes``, else a temp folder with a symlink."""
    if PACK_ROOT.name == PACK_NAME:
        return PACK_ROOT.parent
    # One folder per checkout (keyed by its path), so two checkouts on a machine never share a link.
    key = hashlib.sha1(str(PACK_ROOT).encode()).hexdigest()[:12]
    d = Path(tempfile.gettempdir()) / f"instantfamily_custom_nodes_{key}"
    d.mkdir(exist_ok=True)
    link = d / PACK_NAME
    if not link.exists():
        try:
            link.symlink_to(PACK_ROOT, target_is_directory=True)
        except FileExistsError:  # another process made it meanwhile
            pass
    if link.resolve() != PACK_ROOT:
        raise RuntimeError(f"{link} points at {link.resolve()}, not this pack ({PACK_ROOT}); remove it")
    return d


# ---------------------------------------------------------------- in-process ComfyUI

@dataclass
class _State:
    comfyui: Path | None = None
    pack_loaded: bool = False
    yamls: set[str] = field(default_factory=set)
    executor: Any = None     # the kept PromptExecutor of run_prompt(keep_cache=True)
    executor_output_dir: str | None = None


_STATE = _State()


def _extra_config_loader(path: Path):
    """ComfyUI's ``utils.extra_config.load_extra_path_config``. ComfyUI's nodes.py puts ``comfy/`` first
    on sys.path when imported, and ``comfy/utils.py`` then shadows the top-level ``utils`` package (main.py
    imports it before nodes.py; here nodes may already be imported): import it with ComfyUI's folder first."""
    shadow = sys.modules.get("utils")
    if shadow is not None and not hasattr(shadow, "__path__"):
        del sys.modules["utils"]           # comfy/utils.py cached under the package's name by a failed import
    saved = list(sys.path)
    sys.path.insert(0, str(path))
    try:
        from utils.extra_config import load_extra_path_config
    finally:
        sys.path[:] = saved
    return load_extra_path_config


def setup_comfyui(comfyui: str | os.PathLike | None = None, extra_model_paths: Iterable[str | os.PathLike] = (),
                  cpu: bool | None = None, output_dir: str | os.PathLike | None = None,
                  input_dir: str | os.PathLike | None = None, quiet: bool = False) -> Path:
    """Import ComfyUI in this process and register its nodes plus this pack (idempotent).

    ``cpu``: force CPU (None: ComfyUI's own choice). On CPU, PyTorch SDPA attention is chosen: ComfyUI's
    CPU default (sub-quadratic) is 5-10x slower. Must run before anything imports comfy.model_management
    for these flags to take effect. ``quiet``: hide ComfyUI's warnings while its built-in nodes load
    (e.g. the torchaudio tracebacks of audio nodes, which the pack does not use)."""
    path = find_comfyui(comfyui) if _STATE.comfyui is None else _STATE.comfyui
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
    import comfy.cli_args

    args = comfy.cli_args.args
    if _STATE.comfyui is None:
        if cpu or (cpu is None and not _cuda_available()):
            args.cpu = True
            args.use_pytorch_cross_attention = True
        args.disable_api_nodes = True
    _STATE.comfyui = path
    import folder_paths

    load_extra_path_config = _extra_config_loader(path)
    for y in extra_model_paths:
        key = str(Path(y).resolve())
        if key not in _STATE.yamls:
            load_extra_path_config(key)
            _STATE.yamls.add(key)
    if output_dir is not None:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        folder_paths.set_output_directory(str(output_dir))
    if input_dir is not None:
        Path(input_dir).mkdir(parents=True, exist_ok=True)  # Load Image lists it when validating
        folder_paths.set_input_directory(str(input_dir))
    if not _STATE.pack_loaded:
        root = logging.getLogger()
        level = root.level
        if quiet:
            root.setLevel(logging.ERROR)
        try:
            import nodes

            asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
        finally:
            root.setLevel(level)
        module_dir = pack_custom_nodes_dir() / PACK_NAME
        ok = asyncio.run(nodes.load_custom_node(str(module_dir), set(nodes.NODE_CLASS_MAPPINGS),
                                                module_parent="custom_nodes"))
        if not ok:
            raise RuntimeError(f"ComfyUI could not load the pack from {module_dir}; see the log above")
        _STATE.pack_loaded = True
    return path


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


class _ServerStub:
    """What PromptExecutor needs from PromptServer: a client id, the last node, and message sinks."""

    def __init__(self, on_message: Callable[[str, dict], None] | None = None) -> None:
        self.client_id: str | None = None
        self.last_node_id: str | None = None
        self.last_prompt_id: str | None = None
        self.sockets_metadata: dict = {}
        self.messages: list[tuple[str, Any]] = []
        self._on_message = on_message

    def send_sync(self, event: str, data: Any, sid: str | None = None) -> None:
        self.messages.append((event, data))
        if self._on_message is not None and isinstance(data, dict):
            self._on_message(event, data)

    def queue_updated(self) -> None:
        pass


@dataclass
class RunResult:
    prompt_id: str
    outputs: dict[str, dict]            # node id -> UI output ({"images": [...]}, ...), as in /history
    messages: list[tuple[str, dict]]
    seconds: float

    def image_files(self, node_id: str | None = None, kind: str = "output") -> list[Path]:
        """Files written by image-output nodes (SaveImage: kind 'output'; previews: 'temp')."""
        import folder_paths

        base = {"output": folder_paths.get_output_directory(), "temp": folder_paths.get_temp_directory()}[kind]
        files = []
        for nid, out in self.outputs.items():
            if node_id is not None and nid != node_id:
                continue
            for im in out.get("images", []):
                if im.get("type") == kind:
                    files.append(Path(base) / im.get("subfolder", "") / im["filename"])
        return files


def format_validation_errors(prompt: dict, error: dict | None, node_errors: dict) -> str:
    """ComfyUI's validation answer as readable lines: which node, which input, what is wrong."""
    lines = []
    if error:
        lines.append(f"{error.get('message', 'invalid prompt')}: {error.get('details', '')}".rstrip(": "))
    for nid, info in (node_errors or {}).items():
        ctype = info.get("class_type") or prompt.get(nid, {}).get("class_type", "?")
        for e in info.get("errors", []):
            extra = e.get("extra_info", {})
            name = extra.get("input_name")
            where = f"node {nid} ({ctype})" + (f" input {name!r}" if name else "")
            lines.append(f"  {where}: {e.get('message', '')} - {e.get('details', '')}".rstrip(" -"))
    return "\n".join(lines) or "invalid prompt (no details from ComfyUI)"


def validate(prompt: dict, prompt_id: str = "validate", strict: bool = True) -> list[str]:
    """``execution.validate_prompt``; returns the output node ids to execute or raises WorkflowError.

    ComfyUI accepts a prompt when at least one output is valid and silently drops the others; ``strict``
    (the default) refuses any node error, so a broken loader cannot hide behind a working preview."""
    import execution

    ok, error, outputs, node_errors = asyncio.run(execution.validate_prompt(prompt_id, prompt, None))
    if not ok or (strict and node_errors):
        raise WorkflowError("ComfyUI refused the workflow:\n" + format_validation_errors(prompt, error, node_errors))
    return list(outputs)


def drop_kept_cache() -> None:
    """Forget the executor :func:`run_prompt` keeps with ``keep_cache=True`` (and the models it holds)."""
    _STATE.executor, _STATE.executor_output_dir = None, None


def run_prompt(prompt: dict, prompt_id: str | None = None,
               on_message: Callable[[str, dict], None] | None = None, keep_cache: bool = False) -> RunResult:
    """Validate and execute an API-format prompt in this process (after :func:`setup_comfyui`).

    ``keep_cache``: run on one executor kept between such calls, as ComfyUI's server does, so nodes whose
    inputs did not change (checkpoint, ControlNet and face-model loaders) are not run again; without it
    every call starts from an empty cache. Like the server's, the kept cache knows model files by name:
    a file replaced under the same name needs a run without ``keep_cache`` or :func:`drop_kept_cache`. A
    new output folder (``setup_comfyui(output_dir=...)``) starts a new kept executor."""
    import execution

    if _STATE.comfyui is None:
        raise RuntimeError("call setup_comfyui() first")
    prompt_id = prompt_id or str(uuid.uuid4())
    outputs = validate(prompt, prompt_id)
    stub = _ServerStub(on_message)
    if keep_cache:
        import folder_paths

        # cached SaveImage outputs are names in the output folder they were written to
        out_dir = folder_paths.get_output_directory()
        if _STATE.executor is None or _STATE.executor_output_dir != out_dir:
            _STATE.executor = execution.PromptExecutor(stub, cache_type=execution.CacheType.CLASSIC)
            _STATE.executor_output_dir = out_dir
        executor = _STATE.executor
        executor.server, executor.success = stub, True     # a failed run before must not mark this one
    else:
        executor = execution.PromptExecutor(stub, cache_type=execution.CacheType.CLASSIC)
    t0 = time.perf_counter()
    executor.execute(prompt, prompt_id, {"client_id": "instantfamily-demo"}, outputs)
    seconds = time.perf_counter() - t0
    # ComfyUI marks success only where a node ran; a node refused at staging leaves it set: only
    # execution_success says the whole graph finished
    finished = any(ev == "execution_success" for ev, _ in executor.status_messages)
    if not executor.success or not finished:
        errs = [d for ev, d in executor.status_messages if ev == "execution_error"]
        if errs:
            e = errs[-1]
            raise WorkflowError(f"node {e.get('node_id')} ({e.get('node_type')}) failed: "
                                f"{e.get('exception_type')}: {e.get('exception_message')}\n"
                                + "".join(e.get("traceback", [])[-6:]))
        raise WorkflowError("the workflow did not finish (interrupted?)")
    return RunResult(prompt_id, executor.history_result["outputs"], list(executor.status_messages), seconds)


# ---------------------------------------------------------------- a real server subprocess

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """``python main.py`` on 127.0.0.1:<free port> (CPU flags, in-memory database), as a context manager.

    ``extra_model_paths``: a yaml whose ``custom_nodes`` entry points at a folder holding the pack (see
    :func:`instantfamily_nodes.demo.tiny.write_extra_model_paths`)."""

    def __init__(self, extra_model_paths: str | os.PathLike, comfyui: str | os.PathLike | None = None,
                 workdir: str | os.PathLike | None = None, extra_args: Iterable[str] = (),
                 python: str = sys.executable) -> None:
        self.comfyui = find_comfyui(comfyui)
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="instantfamily_server_"))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.workdir / "server.log"
        self.cmd = [python, str(self.comfyui / "main.py"), "--listen", "127.0.0.1", "--port", str(self.port),
                    *CPU_SERVER_FLAGS, "--extra-model-paths-config", str(Path(extra_model_paths).resolve()),
                    "--output-directory", str(self.workdir / "output"),
                    "--input-directory", str(self.workdir / "input"),
                    "--temp-directory", str(self.workdir / "temp"),
                    "--user-directory", str(self.workdir / "user"), *extra_args]
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 180.0) -> "ComfyServer":
        for sub in ("output", "input", "temp", "user"):
            (self.workdir / sub).mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "wb")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(self.cmd, cwd=str(self.workdir), stdout=self._log, stderr=subprocess.STDOUT,
                                     env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                self.get("/system_stats", timeout=2)
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"ComfyUI server not up after {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self, timeout: float = 20.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        if getattr(self, "_log", None) is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> "ComfyServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_bytes()[-n:].decode("utf-8", "replace")
        except OSError:
            return ""

    def get(self, route: str, timeout: float = 30.0) -> Any:
        with urllib.request.urlopen(self.url + route, timeout=timeout) as r:
            return json.loads(r.read())

    def post(self, route: str, body: dict, timeout: float = 30.0) -> Any:
        req = urllib.request.Request(self.url + route, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            detail = e.read().decode("utf-8", "replace")
            try:
                d = json.loads(detail)
                detail = format_validation_errors(body.get("prompt", {}), d.get("error"), d.get("node_errors", {}))
            except ValueError:
                pass
            raise WorkflowError(f"POST {route} answered {e.code}:\n{detail}") from None

    def run_prompt(self, prompt: dict, timeout: float = 300.0) -> dict:
        """POST /prompt, then poll /history/<id> until it completes (bounded); returns the history entry."""
        pid = self.post("/prompt", {"prompt": prompt, "client_id": "instantfamily-tests"})["prompt_id"]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            hist = self.get(f"/history/{pid}")
            if pid in hist:
                entry = hist[pid]
                status = entry.get("status", {})
                if status.get("completed") or status.get("status_str") == "error":
                    if status.get("status_str") == "error":
                        msgs = [m for m in status.get("messages", []) if m[0] == "execution_error"]
                        raise WorkflowError(f"prompt {pid} failed: {msgs[-1][1] if msgs else status}")
                    return entry
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI server died while running prompt {pid}:\n{self.log_tail()}")
            time.sleep(0.5)
        raise TimeoutError(f"prompt {pid} not finished after {timeout:.0f} s:\n{self.log_tail()}")


logging.getLogger(__name__).addHandler(logging.NullHandler())
