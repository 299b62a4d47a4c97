"""A stand-in for the EC2 instance metadata service (IMDSv2) on loopback, for the spot watcher.

    with Imds() as imds:  # point AWS_EC2_METADATA_SERVICE_ENDPOINT at imds.url
        imds.announce("terminate", "2026-12-04T19:32:00Z")  # spot/instance-action: 404 -> 200
        imds.recommend_rebalance()  # events/recommendations/rebalance: 404 -> 200
        imds.count("/latest/meta-data/spot/instance-action")  # how many requests it answered

As the real one: PUT /latest/api/token needs the TTL header and answers a token; a GET
without a token it issued is refused with 401 (`expire_tokens()` makes the issued ones so).
"""

from __future__ import annotations

import json
import secrets
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

TOKEN_PATH = "/latest/api/token"
TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
TOKEN_HEADER = "X-aws-ec2-metadata-token"
INSTANCE_ACTION = "/latest/meta-data/spot/instance-action"
REBALANCE = "/latest/meta-data/events/recommendations/rebalance"


class Imds:
    """Serves at `url` (http://127.0.0.1:PORT) from a thread until `close()`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tokens: set[str] = set()
        self._documents: dict[str, str] = {}  # path -> JSON body answered with 200
        self._counts: Counter[str] = Counter()
        self.refused = 0  # GETs answered 401: no token, or one it never issued or expired
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,),
                                        daemon=True)
        self._thread.start()

    def announce(self, action: str = "terminate", time: str = "2026-12-04T19:32:00Z") -> None:
        """A spot interruption notice, as AWS gives it two minutes ahead."""
        self._set(INSTANCE_ACTION, json.dumps({"action": action, "time": time}))

    def recommend_rebalance(self, notice_time: str = "2026-12-04T19:20:00Z") -> None:
        """A rebalance recommendation: the box is at elevated risk of interruption."""
        self._set(REBALANCE, json.dumps({"noticeTime": notice_time}))

    def expire_tokens(self) -> None:
        """Every token issued so far is refused from now on (as after its TTL)."""
        with self._lock:
            self._tokens.clear()

    def count(self, path: str) -> int:
        """How many requests (any method) for path it has answered."""
        with self._lock:
            return self._counts[path]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def __enter__(self) -> Imds:
        return self

    def __exit__(self, *_exc) -> None:
        self.close()

    def _set(self, path: str, body: str) -> None:
        with self._lock:
            self._documents[path] = body

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        imds = self

        class Handler(BaseHTTPRequestHandler):
            def do_PUT(self) -> None:
                if self.path == TOKEN_PATH and (self.headers.get(TTL_HEADER) or "").isdigit():
                    self._answer(200, imds._issue(self.path))
                else:  # no TTL: 400, as AWS answers it
                    imds._counted(self.path)
                    self._answer(400 if self.path == TOKEN_PATH else 404, None)

            def do_GET(self) -> None:
                self._answer(*imds._get(self.path, self.headers.get(TOKEN_HEADER)))

            def _answer(self, status: int, body: str | None) -> None:
                data = (body or "").encode()
                self.send_response(status)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *_args) -> None:
                pass  # no line per request in the test output

        return Handler

    def _counted(self, path: str) -> None:
        with self._lock:
            self._counts[path] += 1

    def _issue(self, path: str) -> str:
        token = secrets.token_urlsafe(32)
        with self._lock:
            self._counts[path] += 1
            self._tokens.add(token)
        return token

    def _get(self, path: str, token: str | None) -> tuple[int, str | None]:
        with self._lock:
            self._counts[path] += 1
            if token not in self._tokens:
                self.refused += 1
                return 401, None
            document = self._documents.get(path)
        return (200, document) if document is not None else (404, None)
