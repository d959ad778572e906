"""A tiny real OpenAI-compatible upstream for the factory gateway's tests.

Run as ``python upstream.py --port P --name NAME``: a FastAPI app under uvicorn answering
``/v1/chat/completions`` and ``/v1/completions`` (plain and SSE), ``/v1/models`` and
``/healthz``. Answers are deterministic: ``"<name> heard <the prompt's words>"`` cut to
``max_tokens`` words, one word per token, with logprobs ``-0.1 * (i + 1) + shift``. Usage
reports a simulated prefix cache: prompt "tokens" are 4-character pieces, and the pieces of
32-character prefix chunks seen before count as cached.

Faults are set per upstream model (or ``"*"``) through ``POST /control``::

    {"model": "m", "mode": "ok" | "hang" | "slow" | "error" | "die_midstream",
     "status": 500, "delay_s": 2.0, "suffix": " drifted", "logprob_shift": 1.0,
     "fail_next": 0, "retry_after": 3, "after_words": 2}

Client-triggered 500s, as real backends have them: a top-level integer such as ``seed``
or ``top_k`` outside the signed 64-bit range (an overflowing sampler), or a prompt
containing ``boom-500``.

``fail_next > 0`` applies the mode to that many requests only, then behaves. ``GET
/control/stats`` counts requests per model; ``GET /control/last?model=m`` returns the last
request body and headers received for that model; ``POST /control/reset`` clears
everything.
Killing the process is the test's job (a real SIGKILL).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

CHUNK_CHARS = 32
BOOM = "boom-500"
"""A prompt containing this gets an HTTP 500 (a request-triggered bug)."""


class State:
    def __init__(self, name: str):
        self.name = name
        self.faults: dict[str, dict[str, Any]] = {}
        self.requests: Counter[str] = Counter()
        self.seen_chunks: set[str] = set()
        self.last: dict[str, dict[str, Any]] = {}

    def fault(self, model: str) -> dict[str, Any]:
        fault = self.faults.get(model) or self.faults.get("*") or {}
        if fault.get("fail_next", 0) > 0:
            fault["fail_next"] -= 1
            if fault["fail_next"] == 0:
                self.faults = {k: v for k, v in self.faults.items() if v is not fault}
            return fault
        return {} if "fail_next" in fault else fault


def _prompt_of(body: dict[str, Any]) -> str:
    if "messages" in body:
        return " ".join(str(m.get("content") or "") for m in body["messages"])
    prompt = body.get("prompt", "")
    return prompt if isinstance(prompt, str) else json.dumps(prompt)


def create_app(state: State) -> FastAPI:
    app = FastAPI()

    def usage(prompt: str, completion: int) -> dict[str, Any]:
        chunks = [
            prompt[: i + CHUNK_CHARS] for i in range(0, len(prompt) - CHUNK_CHARS + 1, CHUNK_CHARS)
        ]
        cached = 0
        for chunk in chunks:
            if chunk not in state.seen_chunks:
                break
            cached = len(chunk)
        state.seen_chunks.update(chunks)
        prompt_tokens = max(1, len(prompt) // 4)
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": min(prompt_tokens, cached // 4)},
        }

    async def generate(request: Request, chat: bool) -> Response:
        body = await request.json()
        model = str(body.get("model"))
        state.requests[model] += 1
        state.last[model] = {"body": body, "headers": dict(request.headers)}
        fault = state.fault(model)
        mode = fault.get("mode", "ok")
        if mode == "hang":
            await asyncio.sleep(3600)
        if mode == "slow":
            await asyncio.sleep(float(fault.get("delay_s", 1.0)))
        huge = [k for k, v in body.items() if isinstance(v, int) and not -(2**63) <= v < 2**63]
        if huge:  # the sampler overflows
            error = {"error": {"message": f"OverflowError: {huge[0]}", "type": "server_error"}}
            return JSONResponse(error, status_code=500)
        if BOOM in _prompt_of(body):  # a request that breaks it, as the gateway cannot tell
            error = {"error": {"message": "crashed on this prompt", "type": "server_error"}}
            return JSONResponse(error, status_code=500)
        if mode == "error":
            status = int(fault.get("status", 500))
            headers = {"Retry-After": str(fault["retry_after"])} if "retry_after" in fault else {}
            error = {"error": {"message": f"injected {status}", "type": "server_error"}}
            return JSONResponse(error, status_code=status, headers=headers)
        prompt = _prompt_of(body)
        max_tokens = int(body.get("max_completion_tokens") or body.get("max_tokens") or 16)
        words = f"{state.name} heard {prompt}{fault.get('suffix', '')}".split()[:max_tokens]
        shift = float(fault.get("logprob_shift", 0.0))
        logprobs = [round(-0.1 * (i + 1) + shift, 4) for i in range(len(words))]
        finish = "length" if len(words) == max_tokens else "stop"
        rid = f"up-{time.time_ns()}"
        if not body.get("stream"):
            text = " ".join(words)
            choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
            if chat:
                choice["message"] = {"role": "assistant", "content": text}
                if body.get("logprobs"):
                    choice["logprobs"] = {
                        "content": [
                            {"token": w, "logprob": lp, "top_logprobs": []}
                            for w, lp in zip(words, logprobs, strict=True)
                        ]
                    }
            else:
                choice["text"] = text
            return JSONResponse(
                {
                    "id": rid,
                    "object": "chat.completion" if chat else "text_completion",
                    "created": int(time.time()),
                    "model": model,
                    "choices": [choice],
                    "usage": usage(prompt, len(words)),
                }
            )
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        token_delay = float(fault.get("token_delay_s", 0.0))

        def chunk(delta_text: str | None, finish_reason: str | None, role: bool = False) -> bytes:
            if chat:
                delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
                if delta_text is not None:
                    delta["content"] = delta_text
                choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
                kind = "chat.completion.chunk"
            else:
                choice = {"index": 0, "text": delta_text or "", "finish_reason": finish_reason}
                kind = "text_completion"
            payload = {"id": rid, "object": kind, "created": 0, "model": model, "choices": [choice]}
            return b"data: " + json.dumps(payload).encode() + b"\n\n"

        async def events() -> AsyncIterator[bytes]:
            if chat:
                yield chunk(None, None, role=True)
            for i, word in enumerate(words):
                if mode == "die_midstream" and i == int(fault.get("after_words", 2)):
                    raise RuntimeError("injected mid-stream death")
                if mode == "hang_midstream" and i == int(fault.get("after_words", 2)):
                    await asyncio.sleep(3600)
                if token_delay:
                    await asyncio.sleep(token_delay)
                yield chunk(word if i == 0 else " " + word, None)
            yield chunk(None if chat else "", finish)
            if include_usage:
                payload = {"id": rid, "object": "chat.completion.chunk", "created": 0,
                           "model": model, "choices": [], "usage": usage(prompt, len(words))}  # fmt: skip
                yield b"data: " + json.dumps(payload).encode() + b"\n\n"
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await generate(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await generate(request, chat=False)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": "any", "object": "model"}]}

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/control")
    async def control(request: Request) -> dict[str, Any]:
        fault = await request.json()
        state.faults[str(fault.pop("model", "*"))] = fault
        return {"faults": state.faults}

    @app.post("/control/reset")
    async def reset() -> dict[str, Any]:
        state.faults.clear()
        state.requests.clear()
        state.seen_chunks.clear()
        state.last.clear()
        return {"ok": True}

    @app.get("/control/last")
    async def last(model: str) -> dict[str, Any]:
        return state.last.get(model, {})

    @app.get("/control/stats")
    async def stats() -> dict[str, Any]:
        return {"requests": dict(state.requests)}

    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--name", required=True)
    args = parser.parse_args()
    uvicorn.run(create_app(State(args.name)), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
