"""cluster.epochs: the one place epochs are computed, and the whole-second form the contract checks."""

from __future__ import annotations

import pytest

from cluster.epochs import Epochs


def test_epoch_of_bounds_and_last_ended_agree():
    epochs = Epochs(genesis=1000.0, length_s=60.0)
    assert epochs.epoch_of(999.0) == 0  # before genesis: epoch 0
    assert [epochs.epoch_of(t) for t in (1000.0, 1059.999, 1060.0)] == [0, 0, 1]
    assert epochs.bounds(2) == (1120.0, 1180.0)
    assert [epochs.last_ended(t) for t in (1000.0, 1059.0, 1060.0, 1180.0)] == [-1, -1, 0, 2]


@pytest.mark.parametrize("genesis", [0.0, 1_767_225_600.0, 1_767_225_600.25, 1_767_225_600.999])
@pytest.mark.parametrize("length", [1.0, 60.0, 3600.0])
def test_onchain_epochs_end_no_later_than_the_ledgers(genesis, length):
    """The contract's end of every epoch (whole seconds) is at or before the ledger's, by under a
    second: an epoch the ledger has closed is settle-able once the chain's clock is there too."""
    epochs = Epochs(genesis, length)
    chain_genesis, chain_length = epochs.onchain()
    assert chain_length == length and 0 <= genesis - chain_genesis < 1
    for epoch in (0, 1, 7, 10**6):
        onchain_end = chain_genesis + (epoch + 1) * chain_length  # the contract's formula
        _, ledger_end = epochs.bounds(epoch)
        assert 0 <= ledger_end - onchain_end < 1
        assert epochs.last_ended(ledger_end) >= epoch


@pytest.mark.parametrize(("genesis", "length"), [(0.0, 0.5), (0.0, 2.5), (-1.0, 60.0)])
def test_what_the_contract_cannot_time_is_refused(genesis, length):
    with pytest.raises(ValueError, match="settle on chain"):
        Epochs(genesis, length).onchain()


@pytest.mark.parametrize(("genesis", "length"), [(0.0, 0.0), (0.0, -1.0), (float("nan"), 1.0)])
def test_invalid_epochs_are_refused(genesis, length):
    with pytest.raises(ValueError):
        Epochs(genesis, length)
