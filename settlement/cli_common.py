"""What the settlement commands share: their common options, the settings and ledger those resolve to,
the distributor they bind to, and chain failures as one-line errors (exit 1) instead of tracebacks.

Used by `settlement.cli`, `settlement.claim` and `settlement.receipts`. web3 and the chain client are
imported where used: they cost a second, and `--help` should not.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer

if TYPE_CHECKING:
    from settlement.chain import Chain
    from settlement.config import SettlementConfig

LedgerOption = Annotated[
    Path | None, typer.Option(help="Ledger path (default: MERITNET_SETTLEMENT_LEDGER_PATH).")
]
EpochLengthOption = Annotated[
    float | None,
    typer.Option(help="Epoch length in seconds; only for a new ledger (an existing one knows its own)."),
]
ContractOption = Annotated[
    str | None, typer.Option(help="Distributor address (default: MERITNET_CHAIN_CONTRACT).")
]
UrlOption = Annotated[str | None, typer.Option(help="JSON-RPC URL (default: MERITNET_CHAIN_URL).")]


def settlement_config(ledger: Path | None, epoch_length: float | None) -> SettlementConfig:
    """Settings from the options and the environment; an existing ledger's own epoch length and
    genesis win (it was written with them), so audits of a ledger need neither flag."""
    from settlement.config import SettlementConfig
    from settlement.ledger import UsageLedger

    overrides: dict[str, Any] = {}
    if ledger is not None:
        overrides["ledger_path"] = ledger
    if epoch_length is not None:
        overrides["epoch_length_s"] = epoch_length
    config = SettlementConfig(**overrides)
    stored = UsageLedger.stored_settings(config.ledger_path)
    if stored is None:
        return config
    length, genesis = stored
    if "epoch_length_s" in config.model_fields_set and config.epoch_length_s != length:
        raise typer.BadParameter(
            f"the ledger at {config.ledger_path} uses epochs of {length:g} s, not {config.epoch_length_s:g} s; "
            "drop --epoch-length (it is read from the ledger)"
        )
    return config.model_copy(update={"epoch_length_s": length, "genesis": genesis})


def open_ledger(config: SettlementConfig):
    from settlement.ledger import UsageLedger

    if not Path(config.ledger_path).exists():
        raise typer.BadParameter(
            f"no ledger at {config.ledger_path}; pass --ledger or set MERITNET_SETTLEMENT_LEDGER_PATH"
        )
    return UsageLedger(config.ledger_path, config.epoch_length_s, genesis=config.genesis)


def when(timestamp: int) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def pending_note(chain: Chain) -> str:
    """'' or a sentence on the reward root still in its veto window (not claimable yet)."""
    window = chain.root_window()
    if not window.pending:
        return ""
    return (
        f"; the reward root of epoch {window.latest_epoch} is pending until {when(window.claimable_at)} "
        f"(in {window.claimable_at - window.now} s; the admin may veto it until then): claim again after that"
    )


def bound_chain(contract: str | None, url: str | None) -> Chain:
    """The distributor named by the options, else by MERITNET_CHAIN_CONTRACT / MERITNET_CHAIN_URL."""
    from eth_utils import is_address

    from settlement.chain import Chain
    from settlement.chain_settings import ChainSettings, redact_url

    settings = ChainSettings(**{k: v for k, v in {"contract": contract, "url": url}.items() if v})
    if not settings.contract:
        raise typer.BadParameter("no contract address: pass --contract or set MERITNET_CHAIN_CONTRACT")
    if not is_address(settings.contract):
        raise typer.BadParameter(f"--contract {settings.contract!r} is not an address (0x and 40 hex digits)")
    chain = Chain.connect(settings)
    with chain_errors():
        if not chain.has_code():
            where = redact_url(settings.url)
            hint = (
                " (the embedded chain lives inside `meritnet up`: pass --url of a JSON-RPC node)"
                if where == "embedded"
                else ""
            )
            fail(f"no contract at {chain.address} on the chain at {where}{hint}: wrong --contract or --url?")
    return chain


def fail(message: str) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)


@contextmanager
def chain_errors() -> Iterator[None]:
    """Chain failures as one line each (exit 1), never a traceback: unreachable node, a contract that
    is not a distributor, a reverted call, a node that refused the transaction."""
    from web3.exceptions import BadFunctionCallOutput, ContractLogicError, Web3RPCError

    from settlement.chain import ChainUnavailable, ContractReverted

    try:
        yield
    except ChainUnavailable as exc:
        fail(str(exc))
    except ContractReverted as exc:
        fail(f"the contract refused: {exc.error}{exc.error_args}")
    except (BadFunctionCallOutput, ContractLogicError):
        fail("the contract does not answer as a meritnet distributor: wrong --contract?")
    except Web3RPCError as exc:
        fail(f"the chain node refused the request: {exc.message or exc}")


def wait_for_pending_root(chain: Chain, wait_s: float) -> bool:
    """Sleep until a reward root in its veto window becomes claimable, if that is within `wait_s`
    (said on stderr: stdout stays the claim's result). True if it waited."""
    import time

    with chain_errors():
        window = chain.root_window()
    left = window.claimable_at - window.now
    if not window.pending or left > wait_s:
        return False
    typer.echo(
        f"the reward root of epoch {window.latest_epoch} is pending until {when(window.claimable_at)} "
        f"(the admin may veto it until then); waiting {left} s for it to become claimable",
        err=True,
    )
    time.sleep(left + 1)  # block timestamps are whole seconds
    return True
