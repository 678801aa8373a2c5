"""LLM servers for the explain tests, all on 127.0.0.1.

* `LlamaServer`: llama-cpp-python's OpenAI-compatible server (`python -m llama_cpp.server`) serving
  the embedded SmolLM2 GGUF under the alias `smollm2-local`; started in a subprocess, ready when
  `/v1/models` answers (bounded wait), terminated at teardown.
* `FaultInjectionServer`: a small OpenAI-shaped HTTP server of the tests' own that injects faults
  at the backend seam. The requested model name picks the behaviour:

  ==================  ===========================================================================
  model               answer
  ==================  ===========================================================================
  ``fault-429``       429 with ``retry-after-ms: 10`` (rate limited)
  ``fault-500``       500 with ``retry-after-ms: 10`` (server error)
  ``fault-malformed`` 200 whose body is not JSON
  ``fault-empty``     200, a well-formed chat completion whose content is empty
  ``fault-401``       401 whose message echoes the Authorization header it received
  ``fault-hang``      holds the request without answering (until `hang_s` passes or the server
                      stops), then closes it
  ``ok``              200, ``"a fixed explanation"`` with logprobs and usage
  ``slow-ok``         the same after 20 ms (to hold many calls in flight at once)
  ``judge-sure``      every reply is the single token "Sure", whose alternatives hold "Yes" and "No"
                      at a combined probability of 1e-5 (case 13: must be unparsed, never scored)
  ``judge-chatty``    replies cycled per request from CHATTY_REPLIES (case 14: "Sure! Yes.",
                      "Final answer: No", ...), each token with its logprob and Yes/No alternatives
  ``fault-mix``       per request, from a seeded draw: 10 % 429, 5 % 500, 5 % hang, 5 % malformed;
                      otherwise a keyword Yes/No judge (Yes when the explanation's last word is in
                      the fenced example), with logprobs
  other               404 "model not found" (as servers answer a model they do not serve)
  ==================  ===========================================================================

  Every request is counted per model (`counts`), so tests can check how often a call was retried, and
  `max_in_flight` records the most requests the server held at once.
"""

from __future__ import annotations

import json
import math
import os
import random
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from offline_llm import keyword_says_yes

LOOPBACK = "127.0.0.1"
SERVED_ALIAS = "smollm2-local"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


class LlamaServer:
    """llama-cpp-python's OpenAI-compatible server on a free loopback port."""

    def __init__(self, gguf: str, *, n_ctx: int = 4096, logits_all: bool = True, startup_s: float = 900.0,
                 log_path: str | None = None):
        self.port = free_port()
        self.base_url = f"http://{LOOPBACK}:{self.port}/v1"
        # The package's own command (python -m sae_lens_ctx.explain.serve), which execs llama_cpp.server.
        cmd = [sys.executable, "-m", "sae_lens_ctx.explain.serve", "--model", gguf, "--model_alias", SERVED_ALIAS,
               "--host", LOOPBACK, "--port", str(self.port), "--n_ctx", str(n_ctx), "--n_threads", "2",
               "--logits_all", "true" if logits_all else "false"]
        self._log = open(log_path or os.devnull, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + startup_s
        while time.monotonic() < deadline:  # bounded readiness loop
            if self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"llama_cpp.server exited with code {self.proc.returncode} (log: {log_path})")
            try:
                with urllib.request.urlopen(f"{self.base_url}/models", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"llama_cpp.server did not become ready within {startup_s:.0f}s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)
        self._log.close()


def _completion(content: str) -> dict:
    return {
        "id": "chatcmpl-fault", "object": "chat.completion", "created": 0, "model": "ok",
        "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": content},
                     "logprobs": {"content": [{"token": w, "logprob": -0.5, "bytes": None,
                                               "top_logprobs": [{"token": w, "logprob": -0.5, "bytes": None},
                                                                {"token": "x", "logprob": -2.0, "bytes": None}]}
                                              for w in content.split(" ") if w]}}],
        "usage": {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14},
    }


def _judge(prompt: str) -> dict:
    """A keyword Yes/No judge's chat completion (see `fault-mix`; the judge of tests/support/offline_llm.py)."""
    answer = "Yes" if keyword_says_yes(prompt) else "No"
    out = _completion(answer)
    p = 0.9 if answer == "Yes" else 0.2
    out["choices"][0]["logprobs"]["content"][0]["top_logprobs"] = [
        {"token": "Yes", "logprob": math.log(p), "bytes": None}, {"token": "No", "logprob": math.log(1 - p), "bytes": None}]
    return out


def _sure() -> dict:
    """Case 13: the reply "Sure", with Yes/No alternatives of negligible probability at its position."""
    out = _completion("Sure")
    out["choices"][0]["logprobs"]["content"][0]["top_logprobs"] = [
        {"token": "Sure", "logprob": -0.1, "bytes": None}, {"token": "Yes", "logprob": math.log(0.7e-5), "bytes": None},
        {"token": "No", "logprob": math.log(0.3e-5), "bytes": None}]
    return out


CHATTY_REPLIES = {"Sure! Yes.": True, "Final answer: No": False, "I would say yes": True, "**YES**": True,
                  "No, it does not.": False, "Not sure": None}
"""Case 14's chatty replies and the answer each must parse to (None: unparsed)."""


def _chatty(i: int) -> dict:
    """Case 14: the i-th chatty reply, tokenised on word starts, every token with its alternatives: at
    a yes token P(Yes) = 0.8 / 0.9, at a no token 0.2 / 0.9, elsewhere Yes and No at 1e-6 each."""
    text = list(CHATTY_REPLIES)[i % len(CHATTY_REPLIES)]
    pieces = [p for p in text.replace(" ", "\0 ").split("\0") if p]
    content = []
    for piece in pieces:
        word = piece.strip(" *!.,:").lower()
        top = ([(piece, 0.8), ("No", 0.1)] if word == "yes" else [(piece, 0.7), ("Yes", 0.2)] if word == "no"
               else [(piece, 0.95), ("Yes", 1e-6), ("No", 1e-6)])
        content.append({"token": piece, "logprob": math.log(top[0][1]), "bytes": None,
                        "top_logprobs": [{"token": t, "logprob": math.log(q), "bytes": None} for t, q in top]})
    out = _completion(text)
    out["choices"][0]["logprobs"]["content"] = content
    return out


MODELS = ("ok", "slow-ok", "judge-sure", "judge-chatty", "fault-mix", "fault-429", "fault-500", "fault-malformed", "fault-empty", "fault-hang",
          "fault-401")
"""What the fault server lists at /v1/models."""


class FaultInjectionServer:
    """An OpenAI-shaped chat server on a free loopback port that fails on purpose (see module doc)."""

    def __init__(self, hang_s: float = 10.0, ok_text: str = "a fixed explanation", seed: int = 0):
        self.counts: Counter[str] = Counter()
        self.in_flight = self.max_in_flight = 0
        self._rng = random.Random(seed)
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        self.hang_s = hang_s
        self.ok_text = ok_text
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output quiet
                pass

            def _send(self, status: int, body: bytes, headers: dict | None = None) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                models = [{"id": m, "object": "model"} for m in MODELS]
                self._send(200, json.dumps({"object": "list", "data": models}).encode())

            def do_POST(self):
                with server._lock:
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    self._answer()
                finally:
                    with server._lock:
                        server.in_flight -= 1

            def _answer(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                model = str(body.get("model"))
                with server._lock:
                    server.counts[model] += 1
                    server.requests.append(body)
                    server.headers.append({k.lower(): v for k, v in self.headers.items()})
                retry = {"retry-after-ms": "10"}
                if model == "fault-mix":
                    with server._lock:
                        draw = server._rng.random()
                    model = ("fault-429" if draw < 0.10 else "fault-500" if draw < 0.15 else "fault-hang"
                             if draw < 0.20 else "fault-malformed" if draw < 0.25 else "judge")
                if model == "judge":
                    self._send(200, json.dumps(_judge(body["messages"][-1]["content"])).encode())
                elif model == "judge-sure":
                    self._send(200, json.dumps(_sure()).encode())
                elif model == "judge-chatty":
                    self._send(200, json.dumps(_chatty(server.counts[model] - 1)).encode())
                elif model == "slow-ok":
                    time.sleep(0.02)
                    self._send(200, json.dumps(_completion(server.ok_text)).encode())
                elif model == "fault-429":
                    self._send(429, b'{"error": {"message": "rate limited", "type": "rate_limit"}}', retry)
                elif model == "fault-500":
                    self._send(500, b'{"error": {"message": "boom", "type": "server_error"}}', retry)
                elif model == "fault-malformed":
                    self._send(200, b'{"choices": [{"message": {"content": "half a json')
                elif model == "fault-empty":
                    self._send(200, json.dumps(_completion("")).encode())
                elif model == "fault-401":  # echoes the key it got, as careless servers do
                    auth = self.headers.get("Authorization", "")
                    self._send(401, json.dumps({"error": {"message": f"Incorrect API key provided: {auth}",
                                                          "type": "invalid_request_error"}}).encode())
                elif model == "fault-hang":
                    server._stopping.wait(server.hang_s)  # bounded: at most hang_s, or until stop()
                    self.close_connection = True
                elif model == "ok":
                    self._send(200, json.dumps(_completion(server.ok_text)).encode())
                else:
                    self._send(404, json.dumps({"error": {"message": f"The model `{model}` does not exist",
                                                          "type": "invalid_request_error",
                                                          "code": "model_not_found"}}).encode())

        self.httpd = ThreadingHTTPServer((LOOPBACK, 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.base_url = f"http://{LOOPBACK}:{self.port}/v1"
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def reset(self) -> None:
        with self._lock:
            self.counts.clear()
            self.requests.clear()
            self.headers.clear()

    def stop(self) -> None:
        self._stopping.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(timeout=10)


class EchoCompletionsServer:
    """An OpenAI-shaped server on a free loopback port that speaks vLLM's documented prompt-logprobs answer:
    `/v1/completions` with ``echo: true, max_tokens: 0, logprobs: k`` returns the prompt as ``text`` and
    ``logprobs`` with ``tokens``, ``token_logprobs``, ``top_logprobs`` (a dict per position, None at the
    first) and ``text_offset``, computed by `score(prompt, k) -> PromptLogprobs` (the embedded model, in the
    tests). The requested model picks the behaviour:

    ==================  ===========================================================================
    model               answer
    ==================  ===========================================================================
    ``echo``            the answer above
    ``echo-misaligned`` the answer with one sequence token dropped from every list (a server whose echo
                        tokens do not line up with the prompt)
    ``echo-stops``      the answer for the first `stop_after` completions, then ``logprobs: null`` (a
                        server that stops giving logprobs mid-run)
    ``chat-only``       404 at /completions (as llama.cpp's server, Ollama, OpenAI answer echo requests);
                        chat answers of one digit token with digit alternatives (its digit: the length of
                        the last "Last token in the text" line, mod 10)
    ==================  ===========================================================================
    """

    MODELS = ("echo", "echo-misaligned", "echo-stops", "chat-only")

    def __init__(self, score, stop_after: int = 2):
        self.counts: Counter[str] = Counter()
        self.requests: list[dict] = []
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _send(self, status: int, payload: dict) -> None:
                body = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                self._send(200, {"object": "list", "data": [{"id": m, "object": "model"} for m in server.MODELS]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
                model = str(body.get("model"))
                with server._lock:
                    server.counts[(model, self.path)] += 1
                    server.requests.append(body)
                    n = server.counts[(model, self.path)]
                if self.path.endswith("/chat/completions"):
                    return self._send(200, _digit_chat(body))
                if model == "chat-only":
                    return self._send(404, {"error": {"message": "Not Found", "type": "not_found"}})
                prompt, k = body["prompt"], int(body.get("logprobs") or 0)
                lp = score(prompt, k)
                logprobs = {"tokens": lp.tokens, "token_logprobs": lp.token_logprobs, "top_logprobs": lp.top_logprobs,
                            "text_offset": lp.text_offset}
                if model == "echo-misaligned":
                    cut = prompt.rfind("<start>")
                    drop = next(i for i, o in enumerate(lp.text_offset) if o > cut and lp.tokens[i] == "\t") - 1
                    logprobs = {key: v[:drop] + v[drop + 1:] for key, v in logprobs.items()}
                if model == "echo-stops" and n > stop_after:
                    logprobs = None
                self._send(200, {"id": "cmpl-echo", "object": "text_completion", "created": 0, "model": model,
                                 "choices": [{"index": 0, "text": prompt, "logprobs": logprobs,
                                              "finish_reason": "length", "stop_reason": None}],
                                 "usage": {"prompt_tokens": len(lp.tokens), "completion_tokens": 0,
                                           "total_tokens": len(lp.tokens)}})

        self.httpd = ThreadingHTTPServer((LOOPBACK, 0), Handler)
        self.httpd.daemon_threads = True
        self.base_url = f"http://{LOOPBACK}:{self.httpd.server_address[1]}/v1"
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(timeout=10)


def _digit_chat(body: dict) -> dict:
    """`chat-only`'s chat answer: one digit with digit alternatives (see `EchoCompletionsServer`)."""
    text = body["messages"][-1]["content"]
    last = text.rsplit("Last token in the text:\n", 1)[-1].split("\n", 1)[0]
    digit = str(len(last) % 10)
    top = [{"token": digit, "logprob": math.log(0.8), "bytes": None},
           {"token": "0", "logprob": math.log(0.1 if digit != "0" else 0.8), "bytes": None}]
    out = _completion(digit)
    out["model"] = body.get("model")
    out["choices"][0]["logprobs"]["content"][0]["top_logprobs"] = top
    out["choices"][0]["logprobs"]["content"][0]["logprob"] = math.log(0.8)
    return out
