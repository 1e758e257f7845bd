"""HTTP to an open node at its pinned endpoint: the one way the network calls an operator's machine.

Admission records an open node at the IP its endpoint's host resolved to (cluster/registration.py
`pinned`), so no later DNS answer can send the network's traffic where the join did not check. An https
endpoint given by name (`https://node.example.com`) keeps that name as `tls_name`; every call still goes
to the pinned IP, but presents the name as TLS SNI, verifies the certificate against it (not the IP,
which no public certificate names) and sends it as the Host header, so a node behind Caddy or nginx
with a certificate for its name is both reachable and authenticated. http endpoints and https ones given
as an IP are called as they were recorded.

Every caller goes through here: the join probe (routing/admission.py), the registry's health probes
(cluster/registry.py) and the gateway's completions (cluster/nodes.py). httpcore reads the
`sni_hostname` request extension as the TLS server_hostname, which sets SNI and is the name Python's
ssl checks the certificate against (check_hostname); the connection itself goes to the URL's host.
"""

from __future__ import annotations

import os
import ssl
from typing import Any

from cluster.registration import endpoint_parts


def tls_context() -> ssl.SSLContext:
    """The certificate authorities open nodes' certificates are verified with: SSL_CERT_FILE or
    SSL_CERT_DIR when set (a network whose nodes use a private CA), else certifi's bundle (httpx's
    default). Hostname checking stays on."""
    if os.environ.get("SSL_CERT_FILE"):
        return ssl.create_default_context(cafile=os.environ["SSL_CERT_FILE"])
    if os.environ.get("SSL_CERT_DIR"):
        return ssl.create_default_context(capath=os.environ["SSL_CERT_DIR"])
    import certifi

    return ssl.create_default_context(cafile=certifi.where())


def pinned_client(**settings: Any):
    """An httpx.AsyncClient for calling open nodes: no redirects (a node could point the network
    anywhere) and nothing from the environment but the CA bundle above (through an HTTP proxy httpx
    would present the IP as SNI, not the node's name). `settings`: timeout, limits, headers."""
    import httpx

    return httpx.AsyncClient(verify=tls_context(), follow_redirects=False, trust_env=False, **settings)


def pinned_request(
    client,
    method: str,
    endpoint: str,
    path: str,
    tls_name: str | None = None,
    *,
    headers: dict[str, str] | None = None,
    content: str | bytes | None = None,
):
    """The httpx.Request for `method` `path` on the pinned `endpoint` (scheme://IP:port), built by
    `client`: to the IP, and with `tls_name` (an https endpoint given by name) as SNI, certificate
    name and Host."""
    headers = dict(headers or {})
    extensions: dict[str, Any] = {}
    if tls_name is not None:
        scheme, _, port = endpoint_parts(endpoint)
        if scheme != "https":
            raise ValueError("tls_name is for https endpoints")
        headers["host"] = tls_name if port == 443 else f"{tls_name}:{port}"
        extensions["sni_hostname"] = tls_name
    return client.build_request(
        method, endpoint + path, headers=headers, content=content, extensions=extensions
    )
