"""A fake Gemini API: a real HTTP server on a loopback port that speaks the REST shapes `google-genai` uses.

    POST /{version}/models/{model}:generateContent
    POST /{version}/models/{model}:streamGenerateContent?alt=sse
    GET  /{version}/models/{model}
    GET  /{version}/models?pageSize=N&pageToken=T        (models.list)

Point the SDK at it with `HttpOptions(base_url=fake.url)` (bankllm: `BANKLLM_GEMINI_BASE_URL`). By default it
answers every request with a deterministic banking answer derived from the prompt (one word = one token, cut at
`maxOutputTokens`), with usage metadata and `avgLogprobs`. It behaves like today's API where that matters:

- it serves only the models in `fake.models` (`MODELS`: Gemini 3.x and a few 2.5 ones); any other name, a retired
  one such as `gemini-2.0-flash` included, answers 404 NOT_FOUND with Google's wording (`fake.models = None`
  serves any name);
- Gemini 3 models think before they answer (`thinkingConfig.thinkingLevel`, default HIGH; Pro models refuse
  MINIMAL), Gemini 2.5 ones too (`thinkingBudget`, 0 switches Flash thinking off); sending both fields, or a level
  to a model that takes a budget, is a 400. Thoughts (`THOUGHTS` tokens per level) are spent from
  `maxOutputTokens` first and reported as `usageMetadata.thoughtsTokenCount`: an output budget that thinking uses
  up gives an empty candidate with `finishReason: MAX_TOKENS`, as the real API does.

A test scripts anything else:

    fake.script(error(503), error(429, retry_after=0.1))   # the next two generate calls fail, then normal answers
    fake.always = error(503)                                 # every generate call fails ("503 forever")
    fake.script(Reply(delay_s=2))                            # a slow answer
    fake.script(safety_block())                              # finishReason SAFETY, no text
    fake.think = 500                                         # every thinking model thinks 500 tokens

Every request is recorded in `fake.requests` (method, path, query, headers, JSON body), so tests can check what
the SDK really sent: the key header, the system instruction, the generation config. Standard library only.
"""
from __future__ import annotations

import json
import re
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

__all__ = ["FakeGemini", "shared_server", "Reply", "Recorded", "error", "safety_block", "prompt_blocked", "answer_text",
           "LOGPROBS_REJECTED", "KEY_INVALID", "MODELS", "THOUGHTS", "BOTH_THINKING_FIELDS", "not_found_message",
           "thoughts_for"]

_STATUS_NAMES = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
                 429: "RESOURCE_EXHAUSTED", 500: "INTERNAL", 503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}
_MESSAGES = {400: "Request contains an invalid argument.", 401: "Request had invalid authentication credentials.",
             403: "Method doesn't allow unregistered callers (callers without established identity).",
             404: "models/nope is not found for API version v1, or is not supported for generateContent.",
             429: "Resource has been exhausted (e.g. check quota).", 500: "An internal error has occurred.",
             503: "The model is overloaded. Please try again later.", 504: "Deadline exceeded."}
LOGPROBS_REJECTED = "Logprobs is not enabled for this model."
KEY_INVALID = "API key not valid. Please pass a valid API key."
BOTH_THINKING_FIELDS = "You can only set only one of thinking budget and thinking level."
MODELS = ("gemini-3.5-flash", "gemini-3.1-flash-lite", "gemini-3.1-pro", "gemini-2.5-pro", "gemini-2.5-flash-lite")
THOUGHTS = {"MINIMAL": 2, "LOW": 16, "MEDIUM": 48, "HIGH": 128}  # tokens of thought per level (Gemini 3)
BUDGET_THOUGHTS = 48  # what a Gemini 2.5 model thinks with a dynamic (-1 or absent) budget; a budget caps it


def not_found_message(model: str, api_version: str = "v1") -> str:
    "Google's wording for a model that does not exist (or no longer does)"
    return (f"models/{model} is not found for API version {api_version}, or is not supported for generateContent. "
            "Call ListModels to see the list of available models and their supported methods.")


def _generation(model: str) -> float | None:
    m = re.match(r"gemini-(\d+(?:\.\d+)?)", model)
    return float(m[1]) if m else None


def thoughts_for(model: str, gc: dict, think: int | None = None) -> tuple[int, str | None]:
    "(tokens the model thinks, or the 400 message) for a generationConfig; `think` overrides the amount"
    tc = gc.get("thinkingConfig") or {}
    level = tc.get("thinkingLevel", tc.get("thinking_level"))
    budget = tc.get("thinkingBudget", tc.get("thinking_budget"))
    if level is not None and budget is not None: return 0, BOTH_THINKING_FIELDS
    gen = _generation(model)
    if gen is None or gen < 2.5: return 0, ("Thinking is not supported by this model." if tc else None)
    if gen < 3:
        if level is not None: return 0, "Thinking level is not supported for this model. Use thinking budget instead."
        if budget == 0: return (0, None) if "pro" not in model else (0, "This model only works in thinking mode.")
        n = BUDGET_THOUGHTS if budget in (None, -1) else min(int(budget), BUDGET_THOUGHTS)
        return (n if think is None else think), None
    level = str(level or "HIGH").upper()
    if level not in THOUGHTS or (level == "MINIMAL" and "pro" in model):
        return 0, f"Thinking level {level} is not supported for this model."
    return (THOUGHTS[level] if think is None else think), None


@dataclass
class Reply:
    "One scripted answer: an HTTP status with a JSON body (None: the normal answer), extra headers, a delay"
    status: int = 200
    body: dict | None = None          # None: the default answer built from the request
    headers: dict = field(default_factory=dict)
    delay_s: float = 0.0              # wait this long before answering (a slow model, a timeout)
    chunks: list[dict] | None = None  # streaming only: these SSE events instead of the default ones


@dataclass
class Recorded:
    "A request as the server saw it"
    method: str
    path: str
    query: dict
    headers: dict   # lower-case names
    body: dict | None
    t: float = field(default_factory=time.monotonic)  # when it arrived (`time.monotonic`)

    @property
    def kind(self) -> str:
        "generateContent, streamGenerateContent or get"
        return self.path.rsplit(":", 1)[1] if ":" in self.path.rsplit("/", 1)[-1] else "get"


def error(status: int, message: str | None = None, *, retry_after: float | None = None,
          retry_delay: str | None = None, reason: str | None = None, delay_s: float = 0.0) -> Reply:
    "A Google-style error reply; `retry_after` sets the header, `retry_delay` (e.g. '1s') a RetryInfo detail"
    details = []
    if reason: details.append({"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": reason,
                               "domain": "googleapis.com"})
    if retry_delay: details.append({"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": retry_delay})
    body = {"error": {"code": status, "message": message or _MESSAGES.get(status, "error"),
                      "status": _STATUS_NAMES.get(status, "UNKNOWN"), **({"details": details} if details else {})}}
    headers = {"Retry-After": f"{retry_after:g}"} if retry_after is not None else {}
    return Reply(status, body, headers, delay_s)


def safety_block(text: str = "") -> Reply:
    "A candidate stopped by the safety filters: finishReason SAFETY, no (or partial) text"
    cand = {"finishReason": "SAFETY", "index": 0,
            "safetyRatings": [{"category": "HARM_CATEGORY_DANGEROUS_CONTENT", "probability": "HIGH", "blocked": True}]}
    if text: cand["content"] = {"role": "model", "parts": [{"text": text}]}
    body = {"candidates": [cand], "usageMetadata": {"promptTokenCount": 12, "totalTokenCount": 12},
            "modelVersion": "gemini-3.5-flash"}
    return Reply(200, body, chunks=[body])


def prompt_blocked() -> Reply:
    "The prompt itself blocked: no candidates, `promptFeedback.blockReason`"
    body = {"promptFeedback": {"blockReason": "SAFETY"}, "usageMetadata": {"promptTokenCount": 12}}
    return Reply(200, body, chunks=[body])


def answer_text(prompt: str) -> str:
    "The fake model's full answer to `prompt` (deterministic, about 40 words)"
    words = re.findall(r"\w+", prompt.lower())[:8]
    return (f"Thank you for contacting us about \"{' '.join(words)}\". I can help with that: please open the "
            "banking app, go to the relevant section and follow the steps shown. If anything is unclear, "
            "call our customer support team, who are happy to help you further today.")


class FakeGemini:
    "A scriptable fake of the Gemini REST API on 127.0.0.1 (start with `start()` or use as a context manager)"

    def __init__(self, *, avg_logprobs: float | None = -0.105, usage: bool = True, chunk_words: int = 4,
                 valid_keys: set[str] | None = None, reject_logprobs: bool = False):
        self.avg_logprobs = avg_logprobs        # None: responses carry no avgLogprobs
        self.usage = usage                      # False: responses carry no usageMetadata
        self.chunk_words = chunk_words          # words per streamed chunk
        self.valid_keys = valid_keys            # None: any key is accepted; else others get 400 API_KEY_INVALID
        self.reject_logprobs = reject_logprobs  # True: a request asking for responseLogprobs gets a 400
        self.always: Reply | None = None        # served to every generate call when the script is empty
        self.model_reply: Reply | None = None   # served to GET models/{model} (None: the model's metadata)
        self.models: tuple[str, ...] | None = MODELS  # the models served (others: 404); None: any name
        self.think: int | None = None           # tokens every thinking model thinks (None: `THOUGHTS` per level)
        self.page_size = 3                      # models.list: most models per page (the SDK asks for more pages)
        self.requests: list[Recorded] = []
        self._script: deque[Reply] = deque()
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    # --- control -----------------------------------------------------------------------------------------
    def script(self, *replies: Reply) -> "FakeGemini":
        "Serve `replies` to the next generate / stream calls, in order"
        with self._lock: self._script.extend(replies)
        return self

    def reset(self) -> "FakeGemini":
        "Forget the script, the recorded requests and every option set since construction"
        with self._lock:
            self._script.clear(); self.requests.clear()
        self.always = self.model_reply = self.valid_keys = self.think = None
        self.models, self.page_size = MODELS, 3
        self.avg_logprobs, self.usage, self.reject_logprobs, self.chunk_words = -0.105, True, False, 4
        return self

    def calls(self, kind: str | None = None) -> list[Recorded]:
        "Recorded requests, optionally only one kind (generateContent, streamGenerateContent, get)"
        return [r for r in self.requests if kind is None or r.kind == kind]

    @property
    def url(self) -> str:
        "Base URL to give the SDK"
        assert self._server, "not started"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> "FakeGemini":
        fake = self
        class Handler(_Handler): server_fake = fake
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, name="fake-gemini", daemon=True).start()
        return self

    def stop(self):
        if self._server: self._server.shutdown(); self._server.server_close(); self._server = None

    def __enter__(self): return self.start()
    def __exit__(self, *exc): self.stop()

    # --- answers -----------------------------------------------------------------------------------------
    def _next(self) -> Reply | None:
        with self._lock:
            if self._script: return self._script.popleft()
        return self.always

    def _answer(self, rec: Recorded, thoughts: int = 0) -> tuple[Reply, list[str], str, int]:
        "The default reply to a generate request: (reply, words, finishReason, thought tokens spent)"
        body = rec.body or {}
        prompt = " ".join(p.get("text", "") for c in body.get("contents", []) for p in c.get("parts", []))
        gc = body.get("generationConfig", {})
        limit = int(gc.get("maxOutputTokens") or 8192)
        thoughts = min(thoughts, limit)  # thinking comes first and counts against maxOutputTokens
        limit -= thoughts
        all_words = answer_text(prompt).split(" ")
        words = [w if i == 0 else " " + w for i, w in enumerate(all_words[:limit])]
        finish = "MAX_TOKENS" if len(all_words) > limit else "STOP"
        return Reply(), words, finish, thoughts

    def _candidate(self, text: str, finish: str | None, with_logprobs: bool, n_tokens: int) -> dict:
        cand: dict = {"content": {"role": "model", "parts": [{"text": text}]} if text else {"role": "model"}, "index": 0}
        if finish:
            cand["finishReason"] = finish
            if self.avg_logprobs is not None: cand["avgLogprobs"] = self.avg_logprobs
        if with_logprobs and n_tokens:
            cand["logprobsResult"] = {"chosenCandidates": [{"token": "x", "logProbability": self.avg_logprobs or -0.1}
                                                           for _ in range(n_tokens)]}
        return cand

    def _usage(self, prompt_tokens: int, n: int, thoughts: int = 0) -> dict:
        if not self.usage: return {}
        return {"usageMetadata": {"promptTokenCount": prompt_tokens, "candidatesTokenCount": n,
                                  **({"thoughtsTokenCount": thoughts} if thoughts else {}),
                                  "totalTokenCount": prompt_tokens + n + thoughts}}

    def serves(self, model: str) -> bool:
        return self.models is None or model in self.models

    def _model(self, name: str) -> dict:
        return {"name": f"models/{name}", "displayName": name, "version": "001", "inputTokenLimit": 1048576,
                "outputTokenLimit": 65536 if (_generation(name) or 0) >= 2.5 else 8192,
                "supportedGenerationMethods": ["generateContent", "countTokens"],
                **({"thinking": True} if (_generation(name) or 0) >= 2.5 else {})}


def _error_body(status: int, message: str, reason: str | None = None) -> dict:
    return error(status, message, reason=reason).body


class _Handler(BaseHTTPRequestHandler):
    server_fake: FakeGemini
    protocol_version = "HTTP/1.0"  # one request per connection: simple and robust for a test server

    def log_message(self, *a): pass  # quiet

    def _record(self) -> Recorded:
        u = urlsplit(self.path)
        n = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(n) if n else b""
        body = json.loads(raw) if raw else None
        rec = Recorded(self.command, u.path, parse_qs(u.query), {k.lower(): v for k, v in self.headers.items()}, body)
        with self.server_fake._lock: self.server_fake.requests.append(rec)
        return rec

    def _send_json(self, status: int, body: dict, headers: dict | None = None):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=UTF-8")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items(): self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _key_rejected(self, rec: Recorded) -> bool:
        keys = self.server_fake.valid_keys
        if keys is None or rec.headers.get("x-goog-api-key") in keys: return False
        self._send_json(400, _error_body(400, KEY_INVALID, "API_KEY_INVALID"))
        return True

    def do_GET(self):
        try:
            rec, fake = self._record(), self.server_fake
            if self._key_rejected(rec): return
            if re.fullmatch(r"/[^/]+/models", rec.path): return self._list(rec)
            m = re.fullmatch(r"/([^/]+)/models/([^/:]+)", rec.path)
            if not m: return self._send_json(404, _error_body(404, f"unknown path {rec.path}"))
            r = fake.model_reply
            if r is not None:
                time.sleep(r.delay_s)
                return self._send_json(r.status, r.body or {}, r.headers)
            if not fake.serves(m[2]): return self._send_json(404, _error_body(404, not_found_message(m[2], m[1])))
            self._send_json(200, fake._model(m[2]))
        except (BrokenPipeError, ConnectionResetError): pass

    def _list(self, rec: Recorded):
        "models.list, paged: `pageSize` (capped by `fake.page_size`) and `pageToken` (an offset)"
        fake = self.server_fake
        names = list(fake.models or MODELS)
        size = min(int((rec.query.get("pageSize") or ["50"])[0]), fake.page_size)
        start = int((rec.query.get("pageToken") or ["0"])[0])
        body: dict = {"models": [fake._model(n) for n in names[start:start + size]]}
        if start + size < len(names): body["nextPageToken"] = str(start + size)
        self._send_json(200, body)

    def do_POST(self):
        try: self._post()
        except (BrokenPipeError, ConnectionResetError): pass  # the client gave up (a timeout test)

    def _post(self):
        rec, fake = self._record(), self.server_fake
        m = re.fullmatch(r"/([^/]+)/models/([^/:]+):(generateContent|streamGenerateContent)", rec.path)
        if not m: return self._send_json(404, _error_body(404, f"unknown path {rec.path}"))
        if self._key_rejected(rec): return
        api_version, model, stream = m[1], m[2], m[3] == "streamGenerateContent"
        if not fake.serves(model): return self._send_json(404, _error_body(404, not_found_message(model, api_version)))
        gc = (rec.body or {}).get("generationConfig", {})
        thoughts, bad = thoughts_for(model, gc, fake.think)
        if bad: return self._send_json(400, _error_body(400, bad))
        want_logprobs = bool(gc.get("responseLogprobs"))
        if want_logprobs and fake.reject_logprobs:
            return self._send_json(400, _error_body(400, LOGPROBS_REJECTED))
        r = fake._next()
        if r is not None and r.delay_s: time.sleep(r.delay_s)
        if r is not None and (r.status != 200 or (r.body is not None and not stream)):
            return self._send_json(r.status, r.body or {}, r.headers)
        default, words, finish, thoughts = fake._answer(rec, thoughts)
        prompt_tokens = sum(len(p.get("text", "").split()) for c in (rec.body or {}).get("contents", [])
                            for p in c.get("parts", []))
        if not stream:
            body = {"candidates": [fake._candidate("".join(words), finish, want_logprobs, len(words))],
                    **fake._usage(prompt_tokens, len(words), thoughts), "modelVersion": model, "responseId": "fake-1"}
            return self._send_json(200, body, (r or default).headers)
        if r is not None and r.chunks is not None: events = r.chunks
        else:
            k = fake.chunk_words
            groups = [words[i:i+k] for i in range(0, len(words), k)] or [[]]
            events = []
            for i, g in enumerate(groups):
                last = i == len(groups) - 1
                ev = {"candidates": [fake._candidate("".join(g), finish if last else None, want_logprobs, len(g))],
                      "modelVersion": model, "responseId": "fake-1"}
                if last: ev.update(fake._usage(prompt_tokens, len(words), thoughts))
                events.append(ev)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for ev in events:
            self.wfile.write(f"data: {json.dumps(ev)}\r\n\r\n".encode()); self.wfile.flush()


_shared: FakeGemini | None = None
_shared_lock = threading.Lock()

def shared_server() -> FakeGemini:
    "One fake server for the whole test session, started on first use (a daemon thread: it ends with the process)"
    global _shared
    with _shared_lock:
        if _shared is None: _shared = FakeGemini().start()
    return _shared
