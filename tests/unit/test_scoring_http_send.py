"""http_send really sends: a challenge reaches the gateway with the pinning headers."""

import asyncio
import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

from scoring.challenge import ChallengeConfig, ChallengePool
from scoring.challenge_client import http_send


def test_http_send_posts_the_challenge_with_pinning_headers():
    seen = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["content-length"])))
            seen.append(
                (
                    self.path,
                    self.headers["x-meritnet-node"],
                    self.headers["x-meritnet-challenge-key"],
                    body["model"],
                )
            )
            self.send_response(503)
            self.end_headers()
            self.wfile.write(b'{"error": {"message": "busy"}}')

        def log_message(self, *args):
            pass

    srv = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        send = http_send(f"http://127.0.0.1:{srv.server_address[1]}", "secret-key")
        req = ChallengePool(ChallengeConfig()).sample("n1", "default")
        resp = asyncio.run(send(req))
    finally:
        srv.shutdown()
    assert resp.ok is False and resp.status == 503
    assert seen == [(req.path, "n1", "secret-key", "default")]
