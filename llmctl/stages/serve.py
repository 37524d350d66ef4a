"""llmctl serve — an OpenAI-compatible HTTP server for a causal LM: completions, chat completions, streaming.

    llmctl serve ckpt=finetune/smollm2-chat                        # http://127.0.0.1:8000/v1
    llmctl serve ckpt=quantize/smollm2-int8 port=8080 api_key=secret
    llmctl serve ckpt=export/smollm2-q8 host=0.0.0.0               # a GGUF export, reachable from other machines

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="secret")
    client.chat.completions.create(model="finetune/smollm2-chat", messages=[...], stream=True)

Any checkpoint the loader reads (fine-tuned, LoRA-merged, distilled, pruned, quantized, a GGUF export) behind
`/v1/models`, `/v1/completions` (`echo` + `logprobs`, so lm-evaluation-harness's `local-completions` scores
through it), `/v1/chat/completions` (the chat template, `stop`, `max_tokens`, `temperature`, `top_p`, `seed`),
`stream=true` as server-sent events, `usage` counts and `/health`. Requests that arrive together share forward
passes (up to `max_batch` per batch); at most `queue_size` wait, more get 429 with Retry-After. Bad requests are
4xx in OpenAI's error shape. It listens on 127.0.0.1 unless `host` says otherwise; with `api_key` (or
$LLMCTL_API_KEY) requests without it get 401. SIGTERM or Ctrl-C finishes the requests in flight, then exits.
One log line per request on stderr. FastAPI + uvicorn: pip install 'llmctl[serve]'.
"""

from __future__ import annotations

import errno
import importlib.util
import logging
import os
import socket
import sys

from pydantic import Field

from llmctl.core import run as stage_run
from llmctl.core import schema
from llmctl.core.chat import can_chat
from llmctl.core.errors import LlmctlError
from llmctl.core.families import max_positions
from llmctl.core.loading import load_checkpoint, resolve_source, source_kind
from llmctl.core.manifest import task_record
from llmctl.core.models import count_parameters

API_KEY_ENV = "LLMCTL_API_KEY"


class Config(schema.StageConfig):
    """conf/serve.yaml, checked before the stage runs (core/schema.py)."""

    ckpt: str
    host: str
    port: int = Field(ge=0, le=65535)
    api_key: str | None = None
    model_name: str | None = None
    max_tokens: int = Field(ge=1)
    max_batch: int = Field(ge=1)
    queue_size: int = Field(ge=1)
    wait_ms: float = Field(ge=0)
    shutdown_timeout: float = Field(ge=0)


def run(cfg) -> None:
    for module in ("fastapi", "uvicorn"):
        if importlib.util.find_spec(module) is None:
            raise LlmctlError(f"serve needs {module}, which is not installed; pip install 'llmctl[serve]'")
    from llmctl.core.serving.app import Limits, Served, create_app, run_server

    sock = _bind(str(cfg.host), int(cfg.port))  # a port in use is one line before the model loads
    with sock, stage_run.start("serve", cfg, default_name="serve", publishes=False) as run:
        source = resolve_source(run.store, cfg.ckpt, what="ckpt")
        if source_kind(source) != "causal-lm":
            raise LlmctlError(
                f"ckpt={cfg.ckpt} is a {source_kind(source)} checkpoint; serve takes causal LMs (a pretrain/... "
                f"clm, an SFT fine-tune, a GGUF export, model folders like SmolLM2)"
            )
        loaded = load_checkpoint(run.store, source, kind="causal-lm", what="ckpt")
        model, tok = loaded.on(run.rt.device).eval(), loaded.tokenizer
        run.run_model(model)  # precision=auto: fp32 around quantized kernels
        name = str(cfg.model_name or cfg.ckpt)
        served = Served(
            model=model,
            tokenizer=tok,
            model_id=name,
            aliases={source.ref, str(cfg.ckpt)},
            device=run.rt.device,
            autocast=run.rt.autocast,
            chat=can_chat(tok, source),
            api_key=cfg.api_key or os.environ.get(API_KEY_ENV) or None,
            info=_info(loaded, model, run.rt),
        )
        limits = Limits(
            max_tokens=int(cfg.max_tokens),
            max_batch=int(cfg.max_batch),
            queue_size=int(cfg.queue_size),
            wait_ms=float(cfg.wait_ms),
        )
        app = create_app(served, limits)
        _log_requests()
        host, port = sock.getsockname()[:2]
        run.print(
            f"serving [bold]{name}[/] ({type(model).__name__}, {served.info['parameters']:,} parameters"
            f"{', chat' if served.chat else ''}) at [bold]http://{_show_host(host)}:{port}/v1[/] · batches of up to "
            f"{limits.max_batch} · {limits.queue_size} may wait · max_tokens ≤ {limits.max_tokens}"
            + (" · API key required" if served.api_key else "")
        )
        if getattr(model, "llmctl_kernels", None):  # a quantized model: which kernels this machine runs it with
            run.print(f"[dim]kernels: {model.llmctl_kernels}[/]")
        run_server(app, sock, shutdown_timeout=float(cfg.shutdown_timeout), on_shutdown=lambda: _draining(run))
        batcher = app.state.batcher
        run.print(
            f"[dim]stopped: {app.state.requests} request(s) answered, {batcher.batches} batch(es) decoded, "
            f"largest {batcher.largest}[/]"
        )
    return None


def _bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound here (uvicorn serves on it) so a port in use or an address this machine does not
    have is one line."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise LlmctlError(
                f"port={port}: {host}:{port} is already in use (another server?); set port=<a free port> or stop "
                f"what listens there"
            ) from None
        if e.errno == errno.EACCES:
            raise LlmctlError(f"port={port}: binding ports below 1024 needs root; set port=8000 or higher") from None
        raise LlmctlError(f"host={host}: cannot listen there ({e.strerror}); set host=127.0.0.1 or 0.0.0.0") from None
    # listening before the URL is printed: a client that connects at once waits in the backlog until uvicorn
    # accepts, instead of being refused
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _show_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _info(loaded, model, rt) -> dict:
    """What /v1/models says about the model, from its manifest."""
    artifact = loaded.artifact or {}
    return {
        "source": loaded.source.ref,
        "kind": loaded.kind,
        "task": (task_record(loaded.source.manifest) or {}).get("name"),
        "format": artifact.get("format", "hf"),
        "quantization": (artifact.get("quantization") or {}).get("scheme"),
        "weights_sha256": loaded.sha256,
        "parameters": count_parameters(model)[0],
        "max_model_len": max_positions(model.config),
        "device": str(rt.device),
        "precision": rt.precision,
    }


def _log_requests() -> None:
    """llmctl.serve's per-request lines to stderr, with a timestamp."""
    log = logging.getLogger("llmctl.serve")
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def _draining(run) -> None:
    run.print("[dim]shutting down: finishing the requests in flight (Ctrl-C again to stop at once)[/]")
