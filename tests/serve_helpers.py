"""A real `llamascope serve` application on 127.0.0.1 (ephemeral port) in a thread, for tests."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llamascope_sdk.serve import Limits, ServeConfig, create_app
from llamascope_sdk.serve.runner import bind
from llamascope_sdk.steering.pool import SaePool
from tests.helpers import make_release

KEY = "test-key-123"
MODEL_ID = "smollm2-135m"


@dataclass
class Running:
    url: str
    app: Any
    pool: SaePool
    layer5: str  # a synthetic SAE folder at layer 5 of SmolLM2 (d_model 576)

    @property
    def scheduler(self) -> Any:
        return self.app.state.server.scheduler


def layer5_sae(folder: Path) -> str:
    return str(make_release(folder, layer=5, d_model=576, d_sae=2048, seed=5, threshold=0.02))


@contextmanager
def serving(app: Any, log_level: str) -> Iterator[str]:
    """Run ``app`` with uvicorn on 127.0.0.1 (any free port) in a thread until the block ends;
    yields its base URL. The server stops within 60 s of the block's end."""
    import uvicorn

    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=60)
        sock.close()


@contextmanager
def running_server(model: Any, tok: Any, folder: Path, **config: Any):
    """Serve ``model`` until the block ends (the server stops within 60 s)."""
    sae5 = layer5_sae(folder)
    pool = SaePool("1GB")
    cfg = ServeConfig(model_id=MODEL_ID, api_key=KEY, served_saes=(sae5, "demo"),
                      limits=Limits(max_edits=8, max_tokens=256, default_max_tokens=16), **config)
    app = create_app(model, tok, pool, cfg)
    with serving(app, "warning") as url:
        yield Running(url, app, pool, sae5)


@contextmanager
def scheduler_paused(scheduler: Any):
    """Hold the scheduler thread between steps, so that requests sent meanwhile wait and are
    admitted together when the block ends."""
    gate, started = threading.Event(), threading.Event()
    fut = scheduler.call(lambda: (started.set(), gate.wait(120)))
    assert started.wait(120), "the scheduler did not pause"
    try:
        yield
    finally:
        gate.set()
        fut.result(timeout=120)


def wait_for(cond: Any, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.02)
