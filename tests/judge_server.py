"""A small scripted OpenAI-compatible chat server on 127.0.0.1 for deterministic judge tests.

Behaviour by the requested model name:
  fair     - 9 for an answer containing GOOD, else 4 (so verdicts follow content)
  biased   - always "9 5": prefers whatever it reads first
  garbled  - text with no scores on the first line
  flaky    - HTTP 500 on every other request, otherwise like 'fair' (the client retries)
  strict   - HTTP 400 (as a server does for a prompt over its context length)
"""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # quiet
        pass

    def do_POST(self):
        srv = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with srv.lock:
            srv.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
            n = len(srv.requests)
        model = body.get("model")
        if model == "flaky" and n % 2 == 1:
            self.send_response(500)
            self.end_headers()
            return
        if model == "strict":
            data = json.dumps({"error": {"message": "prompt exceeds the context length", "code": 400}}).encode()
            self.send_response(400)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        user = body["messages"][-1]["content"]
        answers = re.findall(r"answer starts\]\n(.*?)\n\[Assistant \d's answer ends", user, re.S)
        if model == "biased":
            text = "9 5\nThe first answer reads better."
        elif model == "garbled":
            text = "Both assistants did their best.\nScores withheld."
        else:
            s1, s2 = (9 if "GOOD" in a else 4 for a in answers)
            text = f"{s1} {s2}\nScored by the presence of GOOD."
        payload = {"id": f"cmpl-{n}", "object": "chat.completion", "created": 0, "model": model,
                   "choices": [{"index": 0, "finish_reason": "stop",
                                "message": {"role": "assistant", "content": text}}],
                   "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
        data = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class ScriptedJudgeServer:
    def __enter__(self):
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.requests = []
        self.httpd.lock = threading.Lock()
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        return self

    @property
    def requests(self) -> list[dict]:
        return self.httpd.requests

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
