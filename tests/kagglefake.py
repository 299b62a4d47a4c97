"""A stand-in for api.kaggle.com behind an HTTPS proxy, for the real `kaggle` client.

The client is the real `kaggle` package, unchanged: it reaches this server the way it
reaches Kaggle from behind a corporate proxy (HTTPS_PROXY, plus REQUESTS_CA_BUNDLE naming
this server's test CA). The proxy answers CONNECT, terminates TLS with a certificate for
the requested host signed by that CA, and serves the two requests a competition download
makes: the API call (authenticated; 401 or 403 as Kaggle answers them) and the redirect
to the file.
"""

from __future__ import annotations

import base64
import datetime
import json
import socket
import ssl
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

API_HOST = "api.kaggle.com"
DOWNLOAD_PATH = "/v1/competitions.CompetitionApiService/DownloadDataFiles"
FILE_PATH = "/fake-storage/{competition}.zip"
LAST_MODIFIED = "Wed, 01 Jan 2025 00:00:00 GMT"
CERT_DAYS = 2


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _certificates(directory: Path) -> tuple[Path, Path, Path]:
    """A test CA and a certificate it signed for API_HOST: (ca.pem, host.pem, host.key)."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, host_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(_name("dlbox test CA")).issuer_name(_name("dlbox test CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(hours=1))
          .not_valid_after(now + datetime.timedelta(days=CERT_DAYS))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    host = (x509.CertificateBuilder().subject_name(_name(API_HOST)).issuer_name(ca.subject)
            .public_key(host_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=CERT_DAYS))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(API_HOST)]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = directory / "ca.pem", directory / "host.pem", directory / "host.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(host.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(host_key.private_bytes(serialization.Encoding.PEM,
                                                serialization.PrivateFormat.PKCS8,
                                                serialization.NoEncryption()))
    return paths


class FakeKaggle:
    """The fake API: which users may download which competition's zip, and what it saw."""

    def __init__(self, directory: Path, username: str, key: str, files: dict[str, bytes]) -> None:
        self.username, self.key = username, key
        self.files = files  # competition -> its zip
        self.rules_accepted = True
        self.downloads: list[str] = []  # competitions served
        self.on_download: Callable[[], None] | None = None  # runs while a download is served
        self.ca, host_cert, host_key = _certificates(directory)
        self._tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._tls.load_cert_chain(host_cert, host_key)
        self._proxy = ThreadingHTTPServer(("127.0.0.1", 0), _proxy_handler(self))
        self._proxy.daemon_threads = True
        self._thread = threading.Thread(target=self._proxy.serve_forever, daemon=True)

    @property
    def proxy_url(self) -> str:
        return f"http://127.0.0.1:{self._proxy.server_address[1]}"

    def env(self) -> dict[str, str]:
        """What a client's environment needs to reach this server instead of Kaggle."""
        return {"HTTPS_PROXY": self.proxy_url, "https_proxy": self.proxy_url,
                "REQUESTS_CA_BUNDLE": str(self.ca), "NO_PROXY": "", "no_proxy": ""}

    def start(self) -> FakeKaggle:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._proxy.shutdown()
        self._proxy.server_close()

    def authorised(self, header: str | None) -> bool:
        expected = base64.b64encode(f"{self.username}:{self.key}".encode()).decode()
        return header in (f"Basic {expected}", f"Bearer {self.key}")

    def wrap(self, sock: socket.socket) -> ssl.SSLSocket:
        return self._tls.wrap_socket(sock, server_side=True)


def _proxy_handler(fake: FakeKaggle) -> type[BaseHTTPRequestHandler]:
    class Proxy(BaseHTTPRequestHandler):
        """Answers CONNECT for API_HOST, then speaks HTTP over TLS as the API does."""

        def do_CONNECT(self):
            if self.path.split(":")[0] != API_HOST:
                self.send_error(502, f"this test proxy only knows {API_HOST}")
                return
            self.send_response(200, "Connection established")
            self.end_headers()
            _api_handler(fake)(fake.wrap(self.connection), self.client_address, self.server)
            self.close_connection = True

        def log_message(self, *args):
            pass

    return Proxy


def _api_handler(fake: FakeKaggle) -> type[BaseHTTPRequestHandler]:
    class Api(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _json(self, code: int, body: dict) -> None:
            raw = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def do_POST(self):
            request = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            if self.path != DOWNLOAD_PATH:
                self._json(404, {"code": 404, "message": f"not faked: {self.path}"})
            elif not fake.authorised(self.headers.get("Authorization")):
                self._json(401, {"code": 401, "message": "Unauthenticated"})
            elif request.get("competitionName") not in fake.files:
                self._json(404, {"code": 404, "message": "Competition not found"})
            elif not fake.rules_accepted:
                self._json(403, {"code": 403, "message": "You must accept this competition's "
                                 "rules before you'll be able to download files."})
            else:
                self.send_response(302)
                self.send_header("Location", f"https://{API_HOST}"
                                 + FILE_PATH.format(competition=request["competitionName"]))
                self.send_header("Content-Length", "0")
                self.end_headers()

        def do_GET(self):
            competition = self.path.rsplit("/", 1)[-1].removesuffix(".zip")
            if competition not in fake.files or self.path != FILE_PATH.format(competition=competition):
                self._json(404, {"code": 404, "message": "no such file"})
                return
            if fake.on_download is not None:
                fake.on_download()
            fake.downloads.append(competition)
            body = fake.files[competition]
            self.send_response(200)
            self.send_header("Content-Type", "application/zip")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Last-Modified", LAST_MODIFIED)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    return Api
