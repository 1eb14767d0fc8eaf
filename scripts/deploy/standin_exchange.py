#!/usr/bin/env python3
"""A stand-in exchange for scripts/test-deploy: the exchange's API and its session check.

GET /internal/session answers 200 with `X-Verified-User: <user>` when the request carries the
cookie `session=<user>` (a toy session store: the cookie *is* the user), 401 otherwise. Every
other request is answered 200 with JSON describing it, and recorded as one JSON line in the
log file, so the script can check what reached the exchange and with which headers.

usage: standin_exchange.py PORT LOGFILE
"""

import json
import sys
from http.cookies import SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Exchange(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def handle_any(self):
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length) if length else b""
        if self.path.startswith("/internal/session"):
            cookie = SimpleCookie(self.headers.get("cookie") or "")
            user = cookie["session"].value if "session" in cookie else None
            if user:
                self.answer(200, {"user": user}, {"X-Verified-User": user})
            else:
                self.answer(401, {"error": "no session"})
            return
        seen = {
            "method": self.command,
            "path": self.path,
            "headers": {k.lower(): v for k, v in self.headers.items()},
            "body": body.decode("utf-8", "replace"),
        }
        with open(LOG, "a", encoding="utf-8") as log:
            log.write(json.dumps(seen) + "\n")
        self.answer(200, {"upstream": "exchange", **seen})

    def answer(self, status, payload, headers=None):
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = handle_any

    def log_message(self, *args):
        pass


if __name__ == "__main__":
    PORT, LOG = int(sys.argv[1]), sys.argv[2]
    ThreadingHTTPServer(("127.0.0.1", PORT), Exchange).serve_forever()
