"""Where settlement's chain is and how settlement transacts on it: ChainSettings (env
MERITNET_CHAIN_<FIELD>), and redact_url, the one way an RPC URL reaches a log line or an error.

No web3 here: what reads the settings (the CLI, deploy's wiring) need not load the chain client.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

EMBEDDED = "embedded"

DEPLOY_GAS = 2_000_000  # gas limit of the distributor's deployment (it uses ~1.2M)


def redact_url(url: str) -> str:
    """A JSON-RPC URL safe for logs and errors: scheme, host and port only. Hosted providers put the
    API key in the path, the query or the userinfo, so all three are replaced by '...'."""
    if url == EMBEDDED:
        return url
    try:
        parts = urlsplit(url)
        host = parts.hostname or "?"
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "<unparseable url>"
    hidden = (
        "/..." if (parts.path not in ("", "/") or parts.query or parts.username or parts.password) else ""
    )
    return f"{parts.scheme}://{host}{port}{hidden}"


class ChainSettings(BaseSettings):
    """Where the chain is and how settlement transacts on it (env: MERITNET_CHAIN_<FIELD>)."""

    model_config = SettingsConfigDict(env_prefix="MERITNET_CHAIN_", extra="ignore")

    url: str = Field(
        default=EMBEDDED,
        repr=False,  # may hold a provider's API key; logs and errors use redact_url()
        description="'embedded' for the in-process py-evm chain (eth-tester), or a JSON-RPC URL "
        "(http://, https://), e.g. anvil's http://127.0.0.1:8545.",
    )
    contract: str | None = Field(
        default=None,
        description="Address of the deployed distributor. Unset: the settlement actor deploys one "
        "(always the case on the embedded chain, whose state lives only as long as the process).",
    )
    admin: str | None = Field(
        default=None,
        description="Admin of a distributor the settler deploys: pauses settle and rotates the roles; "
        "meant for a multisig. Unset: the settler key's own address (fine for a local network, not "
        "for a real chain). A bound distributor (contract) keeps its admin.",
    )
    deploy_block: int = Field(
        default=0,
        ge=0,
        description="Block the bound distributor (contract) was deployed in: event history is read from "
        "here. A distributor the settler deploys records its own.",
    )
    log_chunk_blocks: int = Field(
        default=2_000,
        ge=1,
        description="Blocks per eth_getLogs request: hosted RPC providers refuse wider ranges, so logs "
        "are read in pages of this many blocks from deploy_block to the latest block.",
    )
    receipt_timeout_s: float = Field(
        default=60.0, gt=0, description="How long to wait for a receipt before treating the tx as stuck."
    )
    poll_interval_s: float = Field(default=0.2, gt=0, description="Receipt polling interval (seconds).")
    fee_bump_percent: int = Field(
        default=25,
        ge=13,
        le=500,
        description="Fee increase when replacing a tx at the same nonce (dropped, or pending too long); "
        "nodes require at least 10-12.5%.",
    )
    reprice_after_blocks: int = Field(
        default=20,
        ge=1,
        description="A settle tx still pending after this many blocks is replaced at the same nonce with "
        "bumped fees (up to max_fee_cap_wei).",
    )
    max_fee_cap_wei: int = Field(
        default=500 * 10**9,
        gt=0,
        description="The highest max fee per gas (wei) settlement ever signs; a tx that would need more "
        "stays pending at the cap (logged) until the market comes down or the cap is raised.",
    )
    settle_gas_limit: int = Field(
        default=200_000,
        ge=60_000,
        description="Gas limit of a settle tx: ~80k, constant, once the distributor's slots are in use; "
        "up to ~160k for its first settles, which fill empty storage slots.",
    )
    claim_gas_limit: int = Field(default=200_000, ge=60_000, description="Gas limit of a claim tx.")
