"""Real TLS for unit tests, no mocks: a throwaway certificate authority, server certificates it signs
for chosen DNS names, and an HTTPS server (uvicorn) on 127.0.0.1 that records the SNI and the Host
header of every call, so a test can check what a client presented as well as that it connected.

A client trusts the CA through SSL_CERT_FILE (`ca.bundle`), which the network's clients for open nodes
read (cluster/pinned_http.py `tls_context`)."""

from __future__ import annotations

import datetime
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import uvicorn
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _pem_key(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@dataclass
class TestCA:
    """A CA that lives for one test session; `bundle` is its certificate (PEM) for SSL_CERT_FILE."""

    __test__ = False  # not a test class, whatever its name

    folder: Path
    key: ec.EllipticCurvePrivateKey = field(default_factory=lambda: ec.generate_private_key(ec.SECP256R1()))

    def __post_init__(self) -> None:
        now = datetime.datetime.now(datetime.UTC)
        public = self.key.public_key()
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(_name("meritnet test CA"))
            .issuer_name(_name("meritnet test CA"))
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        self.bundle = self.folder / "ca.pem"
        self.bundle.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, *names: str) -> tuple[Path, Path]:
        """(certificate file, key file) of a server certificate for the DNS `names`, signed by this CA."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(names[0]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False
            )
            .sign(self.key, hashes.SHA256())
        )
        stem = self.folder / names[0]
        stem.with_suffix(".crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        stem.with_suffix(".key").write_bytes(_pem_key(key))
        return stem.with_suffix(".crt"), stem.with_suffix(".key")


@dataclass
class TlsServer:
    """An HTTPS server on 127.0.0.1; `sni` and `hosts` list what each connection and request presented."""

    port: int
    server: uvicorn.Server
    sni: list[str | None] = field(default_factory=list)
    hosts: list[str] = field(default_factory=list)

    @property
    def ip_url(self) -> str:
        """The server's URL by IP: what the network records for a node (its pinned endpoint)."""
        return f"https://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True


def serve_https(app, certfile: Path, keyfile: Path) -> TlsServer:
    """Serve the ASGI `app` over TLS with the certificate `certfile` on a free port of 127.0.0.1."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))  # bound here and handed to uvicorn: no race for the port
    tls = TlsServer(port=sock.getsockname()[1], server=None)  # type: ignore[arg-type]

    def context(_config, _default) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(certfile, keyfile)
        ctx.sni_callback = lambda _sock, name, _ctx: tls.sni.append(name)
        return ctx

    async def recording(scope, receive, send):
        if scope["type"] == "http":
            tls.hosts.append(dict(scope["headers"]).get(b"host", b"").decode())
        await app(scope, receive, send)

    config = uvicorn.Config(recording, log_level="warning", ssl_context_factory=context, lifespan="off")
    tls.server = uvicorn.Server(config)
    threading.Thread(target=tls.server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    deadline = time.monotonic() + 10
    while not tls.server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    if not tls.server.started:
        raise RuntimeError("the HTTPS test server did not start within 10 s")
    return tls
