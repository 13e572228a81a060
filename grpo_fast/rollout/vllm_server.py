"""`grpo-fast vllm-serve`: the vllm backend's engine in a process of its own, on GPUs the trainer
does not use (or another host), serving the trainer's rollouts over HTTP.

    CUDA_VISIBLE_DEVICES=1 grpo-fast vllm-serve --config run.yaml [--host H] [--port P] [--set k=v]
    CUDA_VISIBLE_DEVICES=0 grpo-fast train --config run.yaml --set online.vllm_mode=server

The server reads the training config for the engine's vllm_* settings (GPU memory share, tensor
parallel size) and where to listen (online.vllm_server_host / vllm_server_port, or --host /
--port); the trainer's RemoteEngine (grpo_fast/rollout/vllm.py) sends it the rest. Endpoints, all
but /health POST with `?run=<id>` (the trainer run that owns the engine; another run's requests
are refused with 409, never mixed in):

* GET /health: {"server", "engine": built?, "weights": a policy published?, "run", "version"}.
* /engine: the engine spec as JSON (rollout.vllm.engine_spec). Builds the Engine, exactly as
  the colocated backend does, or keeps the running one when the spec is the same, and makes the
  caller's run the owner, with no policy yet.
* /weights?last=0|1: a safetensors chunk of HF-named weights. Chunks are kept until the last,
  then loaded in one in-place reload (vLLM fuses a layer's projections when it has them all).
* /adapter: the LoRA adapter's safetensors, registered under a new LoRA id (never merged).
* /publish?version=v: the policy of version v is complete; generate requests waiting for it go.
* /generate?version=v&wait=s: JSON {prompts (token ids), n, seeds, greedy, sampling, max_tokens,
  stop_token_ids, lora} -> {completions (token ids), logprobs (the sampled tokens')}. It waits up
  to s seconds for version v, so a rank never samples a policy rank 0 has not finished sending.

Requests run in threads; one lock serialises the engine's calls. Errors answer one JSON line,
{"error": ...}, which the trainer raises. Tested by tests/test_vllm_server.py.
"""

from __future__ import annotations

import gc
import json
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Optional
from urllib.parse import parse_qsl, urlsplit

import torch

from ..config import ConfigError
from .vllm import SERVER_NAME, Engine

logger = logging.getLogger(__name__)


class Refused(Exception):
    """A request the server's state cannot take (another run's, a policy it does not hold): 409."""


class PolicyServer:
    """The engine, the run that owns it and the policy version it holds, for the HTTP handler."""

    def __init__(self, cfg):
        self.online = cfg.online
        self.engine: Optional[Engine] = None
        self.run: Optional[str] = None
        # Runs that owned the engine and lost it to a newer one: their waiting requests give up.
        self.past_runs: set[str] = set()
        self.version = -1        # the last published policy version (-1: none yet)
        self.chunks: dict = {}   # weights received since the last reload
        # Every engine call runs on this one thread, one at a time: vLLM's CPU worker sets the
        # thread's OpenMP thread count when it starts and checks it on every forward (a thread
        # per request would not have it), and the engine is not safe to call concurrently.
        self.engine_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self.published = threading.Condition()    # guards run and version; notified on change

    def health(self) -> dict:
        with self.published:
            return {"server": SERVER_NAME, "engine": self.engine is not None, "weights": self.version >= 0,
                    "run": self.run, "version": self.version}

    def _owned(self, run: str) -> None:
        if run != self.run:
            raise Refused(f"run {run} does not own the engine (run {self.run} does: another trainer started since)")

    def _on_engine_thread(self, call: Callable[[], dict]) -> dict:
        return self.engine_thread.submit(call).result()

    def start_engine(self, run: str, body: bytes) -> dict:
        spec = json.loads(body)

        def start() -> dict:
            if self.engine is not None and self.engine.spec == spec:
                logger.info("the engine already holds this model: kept for run %s", run)
            else:
                if self.engine is not None:
                    # Another model (or run shape): the old engine's memory goes before the new one starts.
                    self.engine.close()
                    self.engine = None
                    gc.collect()
                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()
                self.engine = Engine(spec, self.online)
            self.chunks = {}
            with self.published:
                if self.run is not None and self.run != run:
                    self.past_runs.add(self.run)
                self.run, self.version = run, -1
                self.published.notify_all()
            return {}

        return self._on_engine_thread(start)

    def load_weights(self, run: str, body: bytes, last: str) -> dict:
        from safetensors.torch import load

        def push() -> dict:
            self._owned(run)
            self.chunks.update(load(body))
            if last == "1":
                chunks, self.chunks = self.chunks, {}
                self.engine.push_weights(chunks.items())
            return {}

        return self._on_engine_thread(push)

    def load_adapter(self, run: str, body: bytes) -> dict:
        from safetensors.torch import load

        def register() -> dict:
            self._owned(run)
            self.engine.load_adapter(load(body))
            return {}

        return self._on_engine_thread(register)

    def publish(self, run: str, body: bytes, version: str) -> dict:
        with self.published:
            self._owned(run)
            self.version = int(version)
            self.published.notify_all()
        return {}

    def generate(self, run: str, body: bytes, version: str, wait: str) -> dict:
        version, request = int(version), json.loads(body)
        with self.published:
            # Until this run owns the engine and rank 0 has published the version (another rank
            # may ask before rank 0's engine request is through), or a newer run took over.
            if not self.published.wait_for(lambda: run in self.past_runs or (self.run == run and self.version >= version),
                                           float(wait)):
                raise TimeoutError(f"policy version {version} did not arrive within {float(wait):g} s "
                                   f"(the server holds {self.version}): did rank 0 stop?")

        def sample() -> dict:
            # Checked again here: a sync of this run, or another run, may have come in between.
            self._owned(run)
            if self.version != version:
                raise Refused(f"the server holds policy version {self.version}, this rank expects {version}")
            completions, logprobs = self.engine.generate(request.pop("prompts"), **request)
            return {"completions": completions, "logprobs": logprobs}

        return self._on_engine_thread(sample)

    def close(self) -> None:
        self.engine_thread.shutdown(cancel_futures=True)
        if self.engine is not None:
            self.engine.close()
            self.engine = None


def _handler(state: PolicyServer) -> type[BaseHTTPRequestHandler]:
    routes: dict[str, Callable[..., dict]] = {"/engine": state.start_engine, "/weights": state.load_weights,
                                              "/adapter": state.load_adapter, "/publish": state.publish,
                                              "/generate": state.generate}

    class Handler(BaseHTTPRequestHandler):
        def _reply(self, status: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if urlsplit(self.path).path == "/health":
                self._reply(200, state.health())
            else:
                self._reply(404, {"error": f"no such endpoint: GET {self.path}"})

        def do_POST(self) -> None:
            url = urlsplit(self.path)
            route = routes.get(url.path)
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if route is None:
                self._reply(404, {"error": f"no such endpoint: POST {url.path}"})
                return
            try:
                self._reply(200, route(body=body, **dict(parse_qsl(url.query, keep_blank_values=True))))
            except Refused as e:
                self._reply(409, {"error": str(e)})
            except TimeoutError as e:
                self._reply(504, {"error": str(e)})
            except Exception as e:  # the engine's (vLLM's) errors: the trainer gets their first line
                logger.exception("%s failed", url.path)
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                self._reply(500, {"error": f"{type(e).__name__}: {first}"})

        def log_message(self, format: str, *args) -> None:
            logger.debug(format, *args)  # a line per request would drown the server's log

    return Handler


def serve(cfg, host: Optional[str] = None, port: Optional[int] = None) -> None:
    """Serve until interrupted (Ctrl-C / SIGTERM ends it like a KeyboardInterrupt)."""
    import signal

    host = host or cfg.online.vllm_server_host
    port = port or cfg.online.vllm_server_port
    state = PolicyServer(cfg)
    try:
        httpd = ThreadingHTTPServer((host, port), _handler(state))
    except OSError as e:
        raise ConfigError(f"online.vllm_server_port: cannot listen on {host}:{port}: {e.strerror or e}") from None
    httpd.daemon_threads = True
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    logger.info("%s listening on http://%s:%d (the engine starts when a trainer connects)", SERVER_NAME, host, port)
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        logger.info("%s stopping", SERVER_NAME)
    finally:
        httpd.server_close()
        state.close()
