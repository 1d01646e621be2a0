"""Start ``vllm serve`` on loopback, wait until healthy, stop it by PID. For the demo, tests, benchmarks."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

# The usual CPU flags for LLaVA-OneVision video serving (README "Serving on CPU").
# Bind OMP threads to every core: with "auto" on a 2-core machine the worker gets one.
CPU_ENV = {"VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CPU_OMP_THREADS_BIND": f"0-{(os.cpu_count() or 1) - 1}"}


def cpu_serve_args(model_dir: str, num_frames: int = 16, media_dir: str | None = None) -> list[str]:
    args = [model_dir, "--dtype", "float32", "--max-model-len", "8192", "--enforce-eager",
            "--limit-mm-per-prompt", json.dumps({"image": 0, "video": 1}),
            "--media-io-kwargs", json.dumps({"video": {"num_frames": num_frames}})]
    if media_dir:
        args += ["--allowed-local-media-path", media_dir]
    return args


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vllm_cli() -> str:
    """The ``vllm`` entry point of this interpreter's environment."""
    local = Path(sys.executable).parent / "vllm"
    return str(local) if local.exists() else (shutil.which("vllm") or "vllm")


@contextmanager
def vllm_server(args: list[str], env: dict[str, str] | None = None, startup_timeout: float = 600):
    """Yields ``(base_url, log_path)``; the server is stopped (SIGTERM, then SIGKILL) on exit."""
    port = free_port()
    log = Path(tempfile.mkstemp(prefix="vllm-serve-", suffix=".log")[1])
    cmd = [vllm_cli(), "serve", *args, "--host", "127.0.0.1", "--port", str(port)]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **CPU_ENV, **(env or {})},
                                start_new_session=True)
    try:
        _wait_healthy(proc, port, log, startup_timeout)
        yield f"http://127.0.0.1:{port}", log
    finally:
        stop(proc)


def _wait_healthy(proc, port: int, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"vllm serve exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"vllm serve was not healthy after {timeout:.0f} s:\n{log.read_text()[-4000:]}")


def stop(proc: subprocess.Popen, grace: float = 30) -> None:
    """SIGTERM the server's process group, SIGKILL it if it lingers."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def video_message(video_url: str, question: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": video_url}},
                                         {"type": "text", "text": question}]}]


def data_url(path: str | Path) -> str:
    import base64

    return "data:video/mp4;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def released(records: str | Path, request_id: str, timeout: float = 30.0) -> dict | None:
    """The record the worker writes when it drops a request's session (``TOKENZOOM_TRACE_DIR``
    = ``records``), or None after ``timeout`` seconds."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = list(Path(records).glob(f"{request_id}*.json"))
        if found:
            return json.loads(found[0].read_text())
        time.sleep(0.2)
    return None


def kept_source(records: str | Path, request_id: str) -> list[int]:
    """The source indices (frame * cells + cell) of the tokens of the request's first video that
    reached the LLM, from the record it left in ``records`` (``TOKENZOOM_TRACE_DIR``)."""
    record = released(records, request_id)
    assert record is not None, f"no record of {request_id}"
    cells = record["cells"][0]
    return [f * cells + c for v, f, c in zip(record["video"], record["frame"], record["cell"]) if v == 0]
