"""How the settler keeps and pays epochs: `SettlementConfig` (env MERITNET_SETTLEMENT_<FIELD>), and the
distributor's integer form of a configured stake."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from cluster.epochs import Epochs
from settlement.rewardbook import book_path_of
from settlement.rewards import BPS

# Default emission cap = this x emission_wei: an epoch after one with no eligible usage pays both
# epochs' emission at once; longer carries drain at one extra emission per epoch (see
# settlement.settler.Settler.commitment).
EMISSION_CAP_HEADROOM = 2


class SettlementConfig(BaseSettings):
    """How epochs are kept and paid (env: MERITNET_SETTLEMENT_<FIELD>)."""

    model_config = SettingsConfigDict(env_prefix="MERITNET_SETTLEMENT_", extra="ignore")

    ledger_path: Path = Field(
        default=Path("meritnet-ledger.sqlite"), description="The usage ledger (SQLite)."
    )
    epoch_length_s: float = Field(
        default=3600.0,
        gt=0,
        description="Length of one epoch in seconds: a whole number (>= 1), since the distributor times "
        "epochs with block timestamps (whole seconds).",
    )
    genesis: float = Field(
        default=0.0,
        description="Unix time at which epoch 0 starts; a distributor the settler deploys gets it floored "
        "to a whole second (its epochs then end at or before the ledger's).",
    )
    emission_wei: int = Field(default=10**21, ge=0, description="Reward minted per epoch (wei, 18 decimals).")
    emission_cap_wei: int | None = Field(
        default=None,
        ge=0,
        description="The most one epoch may pay (wei), fixed in a distributor the settler deploys (the "
        f"contract refuses more). None: {EMISSION_CAP_HEADROOM} x emission_wei. A bound distributor "
        "(MERITNET_CHAIN_CONTRACT) keeps the cap it was deployed with.",
    )
    claim_delay_s: int | None = Field(
        default=None,
        ge=0,
        description="Seconds each reward root stays pending on a distributor the settler deploys: the "
        "admin may veto it (a leaked settler key's root) and claims wait for it. None: half the epoch "
        "length (30 min for the default 1 h epochs; 30 s for the demo's 60 s), so the window closes "
        "before the next epoch settles. Must be shorter than an epoch. A bound distributor keeps its own.",
    )
    prompt_weight: int = Field(default=1, ge=0, description="Usage weight of one prompt token (integer).")
    completion_weight: int = Field(
        default=1, ge=0, description="Usage weight of one completion token (integer)."
    )
    default_quality: float | None = Field(
        default=1.0,
        ge=0.0,
        le=1.0,
        description="Quality of a node with no consensus score for the epoch. 1.0 until scoring lands; "
        "None makes the settler wait for scores before committing an epoch.",
    )
    tick_s: float = Field(default=5.0, gt=0, description="Seconds between settlement passes in run().")
    public_rpc_url: str | None = Field(
        default=None,
        description="A JSON-RPC URL of the chain that operators and validators may use, named beside their "
        "reward proofs so `meritnet settlement claim --network URL` needs no --rpc-url (never a URL "
        "holding a provider's key). None: none named.",
    )
    validator_share_bps: int = Field(
        default=2_000,
        ge=0,
        le=BPS,
        description="Validators' part of each epoch's budget in basis points (2,000 = 20%), split by "
        "their Yuma dividends; the rest goes to operators by usage x quality. An epoch with no "
        "validator dividends (no validators, no consensus round) pays operators all of it.",
    )
    validator_stakes: dict[str, float] = Field(
        default_factory=dict,
        description="Validator address -> stake that the settler records on a distributor it deploys "
        "itself while it is that distributor's admin (a local network). A bound distributor "
        "(MERITNET_CHAIN_CONTRACT) keeps the record its admin wrote (`meritnet settlement set-stake`).",
    )
    max_score_wait_epochs: int = Field(
        default=2,
        ge=0,
        description="With default_quality None: an epoch still without consensus scores once this many "
        "later epochs have closed is committed anyway, unscored nodes at weight 0 (so it cannot stop "
        "later epochs for good).",
    )

    @model_validator(mode="after")
    def _cap_covers_emission(self) -> SettlementConfig:
        if self.emission_cap_wei is not None and self.emission_cap_wei < self.emission_wei:
            raise ValueError(
                f"emission_cap_wei ({self.emission_cap_wei}) is below emission_wei ({self.emission_wei}): "
                "the carried difference would grow every epoch and never be paid; raise the cap"
            )
        _, length = self.epochs.onchain()  # whole seconds: the contract must agree with the ledger
        if self.claim_delay_s is not None and length > 0 and self.claim_delay_s >= length:
            raise ValueError(
                f"claim_delay_s ({self.claim_delay_s}) must be shorter than an epoch ({length} s): settle "
                "waits for the last root's veto window, so settlement would fall behind; lengthen the "
                "epochs or shorten the delay"
            )
        return self

    @property
    def epochs(self) -> Epochs:
        return Epochs(self.genesis, self.epoch_length_s)

    @property
    def emission_cap(self) -> int:
        """The cap a newly deployed distributor gets."""
        if self.emission_cap_wei is not None:
            return self.emission_cap_wei
        return EMISSION_CAP_HEADROOM * self.emission_wei

    @property
    def claim_delay(self) -> int:
        """The veto window a newly deployed distributor gets (whole seconds)."""
        if self.claim_delay_s is not None:
            return self.claim_delay_s
        return self.epochs.onchain()[1] // 2

    @property
    def book_path(self) -> Path:
        """The RewardBook lives beside the ledger."""
        return book_path_of(self.ledger_path)


def stake_units(stake: float) -> int:
    """A configured stake (a float, e.g. 2.0) as the distributor's integer record (18 decimals)."""
    return round(stake * 10**18)
