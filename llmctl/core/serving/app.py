"""The FastAPI app `llmctl serve` runs: OpenAI's completions, chat completions and models endpoints.

    app = create_app(Served(model, tokenizer, model_id="finetune/chat@v003", ...), Limits(max_tokens=512))
    uvicorn.run(app, host="127.0.0.1", port=8000)

Every error is a 4xx / 5xx in OpenAI's shape ({"error": {"message", "type", "param", "code"}}): a malformed body
or a bad value 400, an unknown model 404, a prompt longer than the model's positions or `max_tokens` over the cap
400 (`context_length_exceeded`, `max_tokens_exceeded`), a missing or wrong API key 401, a full queue 429 with
`Retry-After`, a server shutting down 503. Each request is one log line: method, path, status, seconds, tokens.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
import uuid
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmctl.core.generation import Row, Sampling, encode, room, stop_ids
from llmctl.core.serving.batcher import Batcher, Job, QueueFull
from llmctl.core.serving.schema import ChatRequest, CompletionRequest, error_body

log = logging.getLogger("llmctl.serve")


@dataclass
class Limits:
    max_tokens: int = 512  # the most tokens one request may ask for
    max_batch: int = 8  # requests decoded together
    queue_size: int = 64  # requests waiting at most; more are answered 429
    wait_ms: float = 5.0  # how long the worker waits for more requests before decoding what it has
    retry_after: int = 1  # seconds, in a 429's Retry-After


@dataclass
class Served:
    """The model being served and what the API says about it."""

    model: object
    tokenizer: object
    model_id: str
    device: object
    autocast: object  # a context manager factory (the run's precision)
    aliases: set = field(default_factory=set)  # other names requests may give it (its versioned reference)
    info: dict = field(default_factory=dict)  # what /v1/models adds about it (kind, task, source)
    chat: bool = True  # whether it can chat (a chat template, or llmctl's SFT format)
    api_key: str | None = None


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        kind: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict | None = None,
    ):
        super().__init__(message)
        self.status, self.body, self.headers = status, error_body(message, kind=kind, param=param, code=code), headers


def create_app(served: Served, limits: Limits):
    tok = served.tokenizer
    batcher = Batcher(
        served.model,
        tok,
        device=served.device,
        autocast=served.autocast,
        pad=tok.pad_token_id if tok.pad_token_id is not None else (stop_ids(tok, chat=False) or [0])[0],
        max_batch=limits.max_batch,
        queue_size=limits.queue_size,
        wait_ms=limits.wait_ms,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        app.state.draining = True
        await asyncio.to_thread(batcher.close)  # what is queued is finished first

    app = FastAPI(title="llmctl serve", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.batcher, app.state.draining, app.state.requests = batcher, False, 0
    created = int(time.time())

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return JSONResponse(e.body, status_code=e.status, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):  # an unknown path, a wrong method
        message = (
            f"{request.method} {request.url.path}: {e.detail}; this server has /v1/models, /v1/completions, "
            "/v1/chat/completions and /health"
        )
        return JSONResponse(error_body(message, code=str(e.status_code)), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def server_error(request: Request, e: Exception):
        log.exception("request failed")
        return JSONResponse(error_body(f"the server failed: {type(e).__name__}: {e}", kind="server_error"), 500)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        if first.get("type") == "json_invalid":
            message, where = "the request body is not valid JSON; send a JSON object", None
        else:
            message = f"{where or 'body'}: {first.get('msg', 'invalid value')}"
        return JSONResponse(error_body(message, param=where or None), status_code=400)

    @app.middleware("http")
    async def guard_and_log(request: Request, call_next):
        started = time.perf_counter()
        request.state.usage = None
        if served.api_key and request.url.path != "/health":
            given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
            if not hmac.compare_digest(given.encode(), served.api_key.encode()):
                response = JSONResponse(
                    error_body(
                        "invalid or missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key"
                    ),
                    status_code=401,
                )
                _log(request, response.status_code, started)
                return response
        response = await call_next(request)
        body, status = response.body_iterator, response.status_code

        async def logged():  # the line is written when the body (a whole stream) has been sent
            try:
                async for part in body:
                    yield part
            finally:
                app.state.requests += request.url.path.startswith("/v1/") and status < 400
                _log(request, status, started)

        response.body_iterator = logged()
        return response

    @app.get("/health")
    def health():
        return {
            "status": "draining" if app.state.draining else "ok",
            "model": served.model_id,
            "waiting": batcher.waiting(),  # requests queued, not yet in a batch
            "batches": batcher.batches,  # batches decoded so far, and the most requests one held
            "largest_batch": batcher.largest,
        }

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [_model_card(served, created)]}

    @app.get("/v1/models/{model_id:path}")
    def model(model_id: str):
        _check_model(served, model_id)
        return _model_card(served, created)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        _check_model(served, body.model)
        prompts = _prompts(tok, body.prompt)
        max_tokens = _budget(served, limits, body.max_tokens, max(len(p) for p in prompts))
        stops = stop_ids(tok, chat=False)
        want = body.logprobs is not None
        jobs = [_submit(request, batcher, _row(ids, max_tokens, stops, body, logprobs=want)) for ids in prompts]
        scored = [
            await _score(request, batcher, ids, body.logprobs or 0) if body.echo and want else None for ids in prompts
        ]
        texts = [tok.decode(ids) if body.echo else "" for ids in prompts]
        if body.stream:
            return _stream(_completion_chunks(request, tok, body, jobs, prompts, texts, served.model_id))
        choices, completion_tokens = [], 0
        for i, (job, ids) in enumerate(zip(jobs, prompts)):
            out = await _collect(tok, job, body.stops())
            completion_tokens += out["count"]
            logprobs = _completion_logprobs(tok, ids, scored[i], out, body.logprobs) if want else None
            choices.append(
                {"index": i, "text": texts[i] + out["text"], "logprobs": logprobs, "finish_reason": out["finish"]}
            )
        usage = _usage(sum(len(p) for p in prompts), completion_tokens)
        request.state.usage = usage
        return {
            "id": f"cmpl-{uuid.uuid4().hex[:24]}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": served.model_id,
            "choices": choices,
            "usage": usage,
        }

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        _check_model(served, body.model)
        if not served.chat:
            raise ApiError(
                400,
                f"{served.model_id} has no chat template and was not fine-tuned on conversations; use /v1/completions",
                param="messages",
                code="chat_not_supported",
            )
        ids = encode(tok, [{"role": m.role, "content": m.text()} for m in body.messages], chat=True)
        asked = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        max_tokens = _budget(served, limits, asked, len(ids), default_to_room=True)
        job = _submit(request, batcher, _row(ids, max_tokens, stop_ids(tok, chat=True), body, logprobs=body.logprobs))
        if body.stream:
            return _stream(_chat_chunks(request, tok, body, job, len(ids), served.model_id))
        out = await _collect(tok, job, body.stops())
        usage = _usage(len(ids), out["count"])
        request.state.usage = usage
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": out["text"]},
            "finish_reason": out["finish"],
            "logprobs": {"content": _chat_logprobs(tok, out)} if body.logprobs else None,
        }
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": served.model_id,
            "choices": [choice],
            "usage": usage,
        }

    return app


# ---------------------------------------------------------------------------------------------
# Requests
# ---------------------------------------------------------------------------------------------
def run_server(app, sock, *, shutdown_timeout: float, on_shutdown) -> None:
    """Serve `app` with uvicorn on a bound socket until SIGTERM / Ctrl-C; then new requests get 503 while the ones
    in flight finish (up to `shutdown_timeout` seconds)."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            if not app.state.draining:
                app.state.draining = True
                on_shutdown()
            super().handle_exit(sig, frame)

        @contextlib.contextmanager
        def capture_signals(self):
            with super().capture_signals():
                yield
                self._captured_signals.clear()  # drained: exit 0 rather than re-raise the signal once served

    config = uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,  # llmctl.serve logs one line per request itself
        timeout_graceful_shutdown=shutdown_timeout,
        lifespan="on",
    )
    Server(config).run(sockets=[sock])


def _check_model(served: Served, name: str) -> None:
    if name != served.model_id and name not in served.aliases:
        raise ApiError(
            404,
            f"the model '{name}' does not exist here; this server serves '{served.model_id}' (GET /v1/models)",
            param="model",
            code="model_not_found",
        )


def _model_card(served: Served, created: int) -> dict:
    return {"id": served.model_id, "object": "model", "created": created, "owned_by": "llmctl", "llmctl": served.info}


def _prompts(tok, prompt) -> list[list[int]]:
    """Token ids of each prompt: a string, a list of strings, a list of token ids or a list of lists of them."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if prompt and all(isinstance(p, int) for p in prompt):
        prompt = [prompt]
    out = []
    for p in prompt:
        ids = list(p) if isinstance(p, list) else encode(tok, p, chat=False)
        if not ids:
            raise ApiError(400, "a prompt is empty; send text or token ids", param="prompt")
        if max(ids) >= len(tok) or min(ids) < 0:
            raise ApiError(400, f"token id {max(ids)} is outside the vocabulary ({len(tok)} tokens)", param="prompt")
        out.append(ids)
    if not out:
        raise ApiError(400, "no prompt given", param="prompt")
    return out


def _budget(
    served: Served, limits: Limits, asked: int | None, prompt_tokens: int, default_to_room: bool = False
) -> int:
    """The new tokens a request may make: what it asked for, within the cap and the model's positions."""
    space = room(served.model, prompt_tokens)
    if space is not None and space <= 0:
        raise ApiError(
            400,
            f"the prompt is {prompt_tokens} tokens, the model's whole context; shorten it",
            param="messages" if default_to_room else "prompt",
            code="context_length_exceeded",
        )
    if asked is None:
        asked = min(limits.max_tokens, space) if space is not None else limits.max_tokens
    if asked > limits.max_tokens:
        raise ApiError(
            400,
            f"max_tokens={asked} is over this server's cap of {limits.max_tokens}; ask for "
            f"{limits.max_tokens} or fewer",
            param="max_tokens",
            code="max_tokens_exceeded",
        )
    if space is not None and asked > space:
        raise ApiError(
            400,
            f"a prompt of {prompt_tokens} tokens plus max_tokens={asked} exceeds the model's "
            f"{prompt_tokens + space} positions; ask for {space} or fewer",
            param="max_tokens",
            code="context_length_exceeded",
        )
    return int(asked)


def _row(ids: list[int], max_tokens: int, stops: list[int], body, *, logprobs: bool) -> Row:
    sampling = Sampling(
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        seed=body.seed,
        greedy=body.temperature == 0,  # the API samples unless temperature is 0 (its default is 1)
    )
    return Row(ids=list(ids), max_new_tokens=max_tokens, stops=stops, sampling=sampling, logprobs=bool(logprobs))


def _submit(request, batcher: Batcher, row: Row) -> Job:
    if request.app.state.draining:
        raise ApiError(
            503,
            "the server is shutting down; retry on another",
            kind="server_error",
            code="unavailable",
            headers={"Retry-After": "1"},
        )
    job = Job(row, loop=asyncio.get_running_loop())
    try:
        batcher.submit(job)
    except QueueFull:
        raise ApiError(
            429,
            f"the server is busy: {batcher.waiting()} requests are waiting; retry shortly",
            kind="rate_limit_error",
            code="rate_limit_exceeded",
            headers={"Retry-After": "1"},
        ) from None
    return job


async def _score(request, batcher: Batcher, ids: list[int], top: int):
    job = Job(Row(ids=list(ids), max_new_tokens=0, stops=[]), loop=asyncio.get_running_loop(), score=top)
    try:
        batcher.submit(job)
    except QueueFull:
        raise ApiError(
            429,
            "the server is busy; retry shortly",
            kind="rate_limit_error",
            code="rate_limit_exceeded",
            headers={"Retry-After": "1"},
        ) from None
    return await job.scores()


class _Text:
    """Generated text, grown token by token. What is handed out (`add`'s return, `sent`) is final: text that could
    still become a stop string, or a character whose bytes are not all made yet, is held back until it is settled;
    at a stop string the text ends before it."""

    def __init__(self, tok, stops: list[str]):
        self.tok, self.stops, self.ids, self.sent, self.logprobs = tok, [s for s in stops if s], [], "", []
        self.stopped, self.finish = False, "length"  # finish: the OpenAI finish_reason, once it is known

    def add(self, token: int, logprob, finished: bool) -> str:
        self.ids.append(token)
        self.logprobs.append(logprob)
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        found = [at for at in (text.find(stop) for stop in self.stops) if at != -1]
        if found:
            text, self.stopped = text[: min(found)], True
        if not (finished or self.stopped):
            text = text[: len(text) - self._pending(text)]
        if not text.startswith(self.sent):  # (a tokenizer that re-spells earlier text: keep what was sent)
            return ""
        new, self.sent = text[len(self.sent) :], text
        return new

    def _pending(self, text: str) -> int:
        """How many characters at the end are not settled: a cut multi-byte character, or a stop string's start."""
        held = len(text) - len(text.rstrip("\ufffd"))
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(text)), 0, -1):
                if text.endswith(stop[:k]):
                    held = max(held, k)
                    break
        return held


async def _collect(tok, job: Job, stops: list[str]) -> dict:
    text, finish = _Text(tok, stops), "length"
    async for token, logprob, finished in job.tokens():
        text.add(token, logprob, finished)
        if finished and token in job.row.stops:
            finish = "stop"
        if text.stopped:
            finish = "stop"
            job.cancel()
            break
    return {"text": text.sent, "finish": finish, "count": len(text.ids), "ids": text.ids, "logprobs": text.logprobs}


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _completion_logprobs(tok, prompt_ids, scored, out: dict, top: int | None) -> dict:
    """The completions API's logprobs: the prompt's tokens first when echoed (the first has none), then the new ones."""
    tokens, token_logprobs, top_logprobs = [], [], []
    if scored is not None:
        chosen, alternatives = scored
        tokens += [tok.decode([i]) for i in prompt_ids]
        token_logprobs += chosen
        top_logprobs += [None] + [{tok.decode([k]): v for k, v in alt.items()} for alt in alternatives[1:]]
    tokens += [tok.decode([i]) for i in out["ids"]]
    token_logprobs += out["logprobs"]
    top_logprobs += [{} for _ in out["ids"]] if top else [None for _ in out["ids"]]
    offsets, at = [], 0
    for t in tokens:
        offsets.append(at)
        at += len(t)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs, "text_offset": offsets}


def _chat_logprobs(tok, out: dict) -> list[dict]:
    return [
        {"token": tok.decode([i]), "logprob": lp, "bytes": list(tok.decode([i]).encode()), "top_logprobs": []}
        for i, lp in zip(out["ids"], out["logprobs"])
    ]


# ---------------------------------------------------------------------------------------------
# Streaming (server-sent events, FastAPI's own formatting)
# ---------------------------------------------------------------------------------------------
def _stream(chunks):
    from fastapi.sse import EventSourceResponse, format_sse_event

    async def events():
        try:
            async for chunk in chunks:
                yield format_sse_event(data_str=json.dumps(chunk))
        except Exception as e:  # the status line has gone: the error is the stream's last event, as vLLM sends it
            log.exception("stream failed")
            yield format_sse_event(data_str=json.dumps(error_body(f"{type(e).__name__}: {e}", kind="server_error")))
        yield format_sse_event(data_str="[DONE]")

    return EventSourceResponse(events())


async def _pieces(job, text: _Text):
    """A streamed job's settled new text, token by token: (text, token id, logprob); `text.finish` says why it ended
    ("stop": a stop token or string; "length": the token budget). A stop string cancels the row; so does a client
    that leaves."""
    try:
        async for token, logprob, finished in job.tokens():
            new = text.add(token, logprob, finished)
            if text.stopped or (finished and token in job.row.stops):
                text.finish = "stop"
            if new:
                yield new, token, logprob
            if text.stopped:
                job.cancel()
                break
    except asyncio.CancelledError:  # the client left: end its row
        job.cancel()
        raise


async def _completion_chunks(request, tok, body, jobs, prompts, texts, model_id):
    cid, created, total = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time()), 0

    def chunk(i, text, finish=None, logprobs=None):
        return {
            "id": cid,
            "object": "text_completion",
            "created": created,
            "model": model_id,
            "choices": [{"index": i, "text": text, "logprobs": logprobs, "finish_reason": finish}],
        }

    for i, job in enumerate(jobs):
        if texts[i]:
            yield chunk(i, texts[i])
        text = _Text(tok, body.stops())
        async for new, token, logprob in _pieces(job, text):
            yield chunk(
                i,
                new,
                logprobs={
                    "tokens": [tok.decode([token])],
                    "token_logprobs": [logprob],
                    "top_logprobs": [None],
                    "text_offset": [0],
                }
                if body.logprobs is not None
                else None,
            )
        total += len(text.ids)
        yield chunk(i, "", text.finish)
    if (body.stream_options or {}).get("include_usage"):
        yield {
            "id": cid,
            "object": "text_completion",
            "created": created,
            "model": model_id,
            "choices": [],
            "usage": _usage(sum(len(p) for p in prompts), total),
        }


async def _chat_chunks(request, tok, body, job, prompt_tokens: int, model_id):
    cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())

    def chunk(delta, finish=None):
        return {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model_id,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }

    yield chunk({"role": "assistant", "content": ""})
    text = _Text(tok, body.stops())
    async for new, _, _ in _pieces(job, text):
        yield chunk({"content": new})
    yield chunk({}, text.finish)
    if (body.stream_options or {}).get("include_usage"):
        yield {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model_id,
            "choices": [],
            "usage": _usage(prompt_tokens, len(text.ids)),
        }


def _log(request, status: int, started: float) -> None:
    usage = getattr(request.state, "usage", None)
    tokens = f" prompt={usage['prompt_tokens']} completion={usage['completion_tokens']}" if usage else ""
    client = request.client.host if request.client else "-"
    log.info(f"{client} {request.method} {request.url.path} {status} {time.perf_counter() - started:.3f}s{tokens}")
