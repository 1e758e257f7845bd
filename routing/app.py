"""The gateway's HTTP surface (FastAPI) and its Ray Serve deployment; the request path itself is
`routing.gateway.GatewayCore`."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import HTMLResponse, JSONResponse, Response

from cluster.local import HEAD_NODE
from cluster.node_http import request_model
from routing import errors, intake, metrics, status
from routing import tokenize as tokenizing
from routing.admission import refuse_hop
from routing.config import GatewayConfig
from routing.gateway import GatewayCore

log = logging.getLogger("meritnet.gateway")

# Response headers a browser page may read (CORS): which node served, the request id (receipts,
# audits), a degraded answer, and when to retry.
EXPOSED_HEADERS = ("x-meritnet-node", "x-meritnet-request-id", "x-meritnet-degraded", "retry-after")


def build_fastapi(core_getter, cors_origins: tuple[str, ...] = ()) -> FastAPI:
    """The HTTP surface; `core_getter()` returns the GatewayCore of this replica. CORS is off unless
    origins are listed (a web page on another origin cannot read answers from a local gateway)."""
    app = FastAPI(title="meritnet", docs_url=None, redoc_url=None)
    if cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(cors_origins),
            allow_methods=["GET", "POST"],
            # any request header: SDKs send their own (the openai JS SDK's x-stainless-*), and a listed
            # origin is trusted to call the endpoint anyway; answers' own headers are readable
            allow_headers=["*"],
            expose_headers=[*EXPOSED_HEADERS],
        )
    _add_error_handlers(app)
    app.include_router(_node_routes(core_getter))
    app.include_router(_view_routes(core_getter))
    app.include_router(_admission_routes(core_getter))
    return app


def _add_error_handlers(app: FastAPI) -> None:
    """Every failure as an OpenAI-shaped error (routing/errors.py), never a stack trace."""

    @app.exception_handler(errors.APIError)
    async def _api_error(_: Request, exc: errors.APIError):
        metrics.ERRORS.labels(str(exc.status), exc.code or exc.type).inc()
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            return errors.not_found(request.url.path).response()
        if exc.status_code == 405:
            return errors.method_not_allowed(request.method, request.url.path).response()
        return errors.APIError(exc.status_code, str(exc.detail)).response()

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception):
        log.error("unexpected gateway error", exc_info=exc)
        return errors.APIError(
            500, "Internal gateway error; it has been logged.", type="server_error"
        ).response()


def _node_routes(core_getter) -> APIRouter:
    """What a node serves (health, models, generation). Each is refused to a request another meritnet
    gateway forwarded (x-meritnet-hop): a gateway registered as a node would relay, loop and be paid
    for others' tokens (issue 28)."""
    router = APIRouter()

    @router.get("/health")
    async def health(request: Request):
        refuse_hop(request.headers)
        core = core_getter()
        await core.refresher.ensure_started()
        live = sum(1 for s in core._nodes.values() if s.live)
        return JSONResponse(
            {"status": "ok" if live else "degraded", "live_nodes": live}, status_code=200 if live else 503
        )

    @router.get("/v1/models")
    async def models(request: Request):
        refuse_hop(request.headers)
        core = core_getter()
        core.check_auth(request)
        await core.refresher.ensure_started()
        return core.views.models()

    @router.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request):
        refuse_hop(request.headers)
        core = core_getter()
        core.check_auth(request)
        await core.refresher.ensure_started()
        return core.views.model(model_id)

    async def _tokenizer(request: Request, answer) -> dict:
        refuse_hop(request.headers)
        core = core_getter()
        core.check_auth(request)
        raw = await intake.read_json(request, core.config.intake)
        return await answer(core._counters, raw, core.config.intake)

    @router.post("/tokenize")
    async def tokenize(request: Request):
        return await _tokenizer(request, tokenizing.tokenize)

    @router.post("/detokenize")
    async def detokenize(request: Request):
        return await _tokenizer(request, tokenizing.detokenize)

    async def _generate(request: Request, method: str) -> Response:
        refuse_hop(request.headers)
        core = core_getter()
        key = core.check_auth(request)
        await core.refresher.ensure_started()
        body = await core.parse(request, request_model(method))
        core.admit(key, body.model)
        return await core.handle(request, body, method, key)

    @router.post("/v1/chat/completions")
    async def chat(request: Request):
        return await _generate(request, "chat")

    @router.post("/v1/completions")
    async def completions(request: Request):
        return await _generate(request, "completions")

    @router.post("/v1/embeddings")
    async def embeddings(request: Request):
        return await _generate(request, "embeddings")

    return router


def _view_routes(core_getter) -> APIRouter:
    """The read-only pages: status, metrics, the node list, an operator's nodes, earnings and proof."""
    router = APIRouter()

    @router.get("/status", response_class=HTMLResponse)
    async def status_page():
        core = core_getter()
        await core.refresher.ensure_started()
        return HTMLResponse(status.render(await core.views.status()))

    @router.get("/status.json")
    async def status_data():
        core = core_getter()
        await core.refresher.ensure_started()
        return JSONResponse(await core.views.status())

    @router.get("/metrics")
    async def prometheus_metrics():
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(await core_getter().views.metrics_text(), media_type=CONTENT_TYPE_LATEST)

    @router.get("/v1/nodes")
    async def nodes_list():
        core = core_getter()
        await core.refresher.ensure_started()
        return {"object": "list", "data": [s.model_dump(exclude={"in_flight"}) for s in core._nodes.values()]}

    @router.get("/v1/operators/{address}")
    async def operator_view(address: str):
        """An operator's nodes (as listed) and, with settlement, what they have earned so far."""
        core = core_getter()
        await core.refresher.ensure_started()
        return await core.views.operator(address)

    @router.get("/v1/receipts/{request_id}")
    async def receipt(request_id: str):
        """A request's usage leaf and Merkle proof under its epoch's usage root on-chain."""
        core = core_getter()
        await core.refresher.ensure_started()
        return JSONResponse(await core.views.receipt(request_id))

    @router.get("/v1/operators/{address}/proof")
    async def operator_proof(address: str):
        """The address's latest cumulative reward leaf and Merkle proof, with the root, epoch, contract
        and chain id to check it against (`meritnet settlement claim --network URL`)."""
        core = core_getter()
        await core.refresher.ensure_started()
        return JSONResponse(await core.views.proof(address), headers={"cache-control": "no-store"})

    return router


def _admission_routes(core_getter) -> APIRouter:
    """Open nodes joining and leaving by a signed message (routing/admission.py), and the signing domain."""
    router = APIRouter()

    @router.get("/v1/nodes/domain")
    async def nodes_domain():
        return _admission(core_getter()).domain()

    @router.post("/v1/nodes", status_code=201)
    async def nodes_join(request: Request):
        core = core_getter()
        raw = await intake.read_json(request, core.config.intake)
        answer = await _admission(core).join(raw)
        log.info("open node %s joined for operator %s", answer["node_id"], answer["operator"])
        return JSONResponse(answer, status_code=201, headers={"cache-control": "no-store"})

    @router.post("/v1/nodes/leave")
    async def nodes_leave(request: Request):
        core = core_getter()
        answer = await _admission(core).leave(await intake.read_json(request, core.config.intake))
        log.info("open node %s left", answer["node_id"])
        return answer

    return router


def _admission(core: GatewayCore):
    if core.admission is None:
        raise errors.APIError(
            403, "This network does not admit open nodes.", type="permission_error", code="no_open_nodes"
        )
    return core.admission


# The replica's GatewayCore. Routes reach it through `current_core`, a module-level function, so
# it is pickled by reference and resolves in the replica process to the core its __init__ set.
_REPLICA: dict[str, GatewayCore] = {}


def current_core() -> GatewayCore:
    return _REPLICA["core"]


def gateway_deployment(config: GatewayConfig):
    """The gateway as a bound Serve application."""
    import ray
    from ray import serve

    app = build_fastapi(current_core, config.cors_origins)

    @serve.deployment(
        name="gateway",
        max_ongoing_requests=2048,
        ray_actor_options={"num_cpus": 0.5, "resources": HEAD_NODE},  # beside the proxy, on the head
    )
    @serve.ingress(app)
    class Gateway:
        def __init__(self, cfg: GatewayConfig):
            from ray.serve import get_deployment_handle

            from cluster.records import deployment_name_for_id
            from routing.selection import load_selector

            handles: dict[str, Any] = {}

            def handle_for(node_id: str):
                if node_id not in handles:
                    name = deployment_name_for_id(node_id)
                    handles[node_id] = get_deployment_handle(name, app_name=name)
                return handles[node_id]

            registry = ray.get_actor(cfg.registry_name, namespace=cfg.namespace)
            sink = (
                ray.get_actor(cfg.usage_sink_name, namespace=cfg.namespace) if cfg.usage_sink_name else None
            )
            import routing.app as this_module

            this_module._REPLICA["core"] = GatewayCore(
                cfg, load_selector(cfg.router_config), handle_for, sink, registry
            )

        async def check_health(self):
            import routing.app as this_module

            await this_module._REPLICA["core"].refresher.ensure_started()

    return Gateway.bind(config)
