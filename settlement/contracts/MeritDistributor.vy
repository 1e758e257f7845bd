# pragma version ~=0.4.3
"""
@title meritnet reward distributor
@notice The reward token plus cumulative Merkle claims. Once per epoch the settler posts the
        epoch's usage root (one leaf per interaction), the reward root (one leaf per operator:
        its cumulative reward up to this epoch) and the epoch's totals. An operator (or anyone
        on its behalf) claims its cumulative amount with a proof and is minted the difference
        to what it already claimed; a second claim of the same amount pays nothing.
        Two roles, so no single key can bend settlement: the settler (a hot key) posts epochs, at
        most `emission_cap` each, fixed at deploy; the admin (meant for a multisig) may pause
        settle and rotate both roles, each in two steps (proposed, then accepted by the new key),
        so a mistyped address can never take a role. Epochs are tied to time: epoch e can be
        settled only once it has ended (block.timestamp >= genesis + (e + 1) * epoch_length), so
        a leaked settler key mints at most the cap per elapsed epoch, never ahead of time, until
        the admin pauses it or hands the role to a new key.
        The admin also keeps the validators' stake record (`stake`), which consensus reads: a
        validator's weight in Yuma is what the admin recorded, never what the validator reports.
@dev Supply model: mint on claim, capped by what settlements posted (totalSupply <= total_rewarded),
     so settle() touches no balance and costs the same whatever the claims did (constant gas).
     Leaves use OpenZeppelin's StandardMerkleTree encoding: keccak256(keccak256(abi.encode(values))),
     pairs hashed in sorted order. Errors are Solidity-ABI custom errors raised with raw_revert
     (Vyper 0.4 has no `error` declarations).
"""

import reward_token

initializes: reward_token
exports: reward_token.__interface__

# A proof of 32 levels covers 2**32 operators; the bound only sizes calldata decoding.
MAX_PROOF_DEPTH: constant(uint256) = 32

# The most one settle may post (wei). Immutable: raising it means deploying a new distributor.
emission_cap: public(immutable(uint256))
# Epoch e is [genesis + e * epoch_length, genesis + (e + 1) * epoch_length), unix seconds.
genesis: public(immutable(uint256))
epoch_length: public(immutable(uint256))

admin: public(address)
pending_admin: public(address)
settler: public(address)
pending_settler: public(address)
paused: public(bool)
next_epoch: public(uint256)
usage_root: public(HashMap[uint256, bytes32])
reward_root: public(bytes32)
total_rewarded: public(uint256)
claimed: public(HashMap[address, uint256])
# Validator address -> stake (any unit: consensus uses shares of the total); 0 = no weight.
stake: public(HashMap[address, uint256])


event EpochSettled:
    epoch: indexed(uint256)
    usage_root: bytes32
    reward_root: bytes32
    interactions: uint256
    epoch_reward: uint256
    total_rewarded: uint256


event Claimed:
    account: indexed(address)
    cumulative: uint256
    amount: uint256


event SettlerProposed:
    settler: indexed(address)
    proposed: indexed(address)


event SettlerChanged:
    previous: indexed(address)
    settler: indexed(address)


event AdminProposed:
    admin: indexed(address)
    proposed: indexed(address)


event AdminChanged:
    previous: indexed(address)
    admin: indexed(address)


event StakeSet:
    validator: indexed(address)
    previous: uint256
    stake: uint256


# OpenZeppelin Pausable's events.
event Paused:
    account: address


event Unpaused:
    account: address


@deploy
def __init__(
    name_: String[32],
    symbol_: String[8],
    admin_: address,
    settler_: address,
    first_epoch: uint256,
    emission_cap_: uint256,
    genesis_: uint256,
    epoch_length_: uint256,
):
    reward_token.__init__(name_, symbol_)
    self._check_nonzero(admin_)
    self._check_nonzero(settler_)
    if epoch_length_ == 0:
        raw_revert(method_id("ZeroEpochLength()"))
    emission_cap = emission_cap_
    genesis = genesis_
    epoch_length = epoch_length_
    self.admin = admin_
    self.settler = settler_
    self.next_epoch = first_epoch
    log AdminChanged(previous=empty(address), admin=admin_)
    log SettlerChanged(previous=empty(address), settler=settler_)


@external
def settle(
    epoch: uint256, usage_root_: bytes32, reward_root_: bytes32, interactions: uint256, epoch_reward: uint256
):
    """Post one epoch once it has ended. Epochs are strictly sequential, so a settled epoch is
    never rewritten."""
    if msg.sender != self.settler:
        raw_revert(concat(method_id("NotSettler(address)"), abi_encode(msg.sender)))
    if self.paused:
        raw_revert(method_id("EnforcedPause()"))
    if epoch_reward > emission_cap:
        raw_revert(
            concat(
                method_id("EmissionCapExceeded(uint256,uint256)"), abi_encode(epoch_reward, emission_cap)
            )
        )
    expected: uint256 = self.next_epoch
    if epoch < expected:
        raw_revert(concat(method_id("EpochAlreadySettled(uint256)"), abi_encode(epoch)))
    if epoch != expected:
        raw_revert(concat(method_id("EpochOutOfOrder(uint256,uint256)"), abi_encode(epoch, expected)))
    # After the order check, so `epoch` is next_epoch and the product cannot overflow.
    ends_at: uint256 = genesis + (epoch + 1) * epoch_length
    if block.timestamp < ends_at:
        raw_revert(concat(method_id("EpochNotEnded(uint256,uint256)"), abi_encode(epoch, ends_at)))
    total: uint256 = self.total_rewarded + epoch_reward
    self.next_epoch = epoch + 1
    self.usage_root[epoch] = usage_root_
    self.reward_root = reward_root_
    self.total_rewarded = total
    log EpochSettled(
        epoch=epoch,
        usage_root=usage_root_,
        reward_root=reward_root_,
        interactions=interactions,
        epoch_reward=epoch_reward,
        total_rewarded=total,
    )


@external
def claim(account: address, cumulative: uint256, proof: DynArray[bytes32, MAX_PROOF_DEPTH]):
    """Mint `account` the part of its cumulative reward it has not claimed yet."""
    already: uint256 = self.claimed[account]
    if cumulative <= already:
        raw_revert(concat(method_id("NothingToClaim(address,uint256)"), abi_encode(account, already)))
    leaf: bytes32 = keccak256(keccak256(abi_encode(account, cumulative)))
    if not self._verify(proof, self.reward_root, leaf):
        raw_revert(concat(method_id("InvalidProof(address,uint256)"), abi_encode(account, cumulative)))
    amount: uint256 = cumulative - already
    # Defence in depth: a bad root can never mint more than the settlements posted.
    if reward_token._total_supply() + amount > self.total_rewarded:
        raw_revert(concat(method_id("ExceedsRewarded(uint256)"), abi_encode(amount)))
    self.claimed[account] = cumulative
    reward_token._mint(account, amount)
    log Claimed(account=account, cumulative=cumulative, amount=amount)


@external
def propose_settler(settler_: address):
    """Admin: name the next settler (key rotation). It takes the role when it calls accept_settler;
    a new proposal replaces the last one."""
    self._check_admin()
    self._check_nonzero(settler_)
    self.pending_settler = settler_
    log SettlerProposed(settler=self.settler, proposed=settler_)


@external
def accept_settler():
    """The proposed settler takes the role (proving it holds the key)."""
    if msg.sender != self.pending_settler:
        raw_revert(concat(method_id("NotPendingSettler(address)"), abi_encode(msg.sender)))
    log SettlerChanged(previous=self.settler, settler=msg.sender)
    self.settler = msg.sender
    self.pending_settler = empty(address)


@external
def propose_admin(admin_: address):
    """Admin: name the next admin; it takes the role when it calls accept_admin."""
    self._check_admin()
    self._check_nonzero(admin_)
    self.pending_admin = admin_
    log AdminProposed(admin=self.admin, proposed=admin_)


@external
def accept_admin():
    """The proposed admin takes the role."""
    if msg.sender != self.pending_admin:
        raw_revert(concat(method_id("NotPendingAdmin(address)"), abi_encode(msg.sender)))
    log AdminChanged(previous=self.admin, admin=msg.sender)
    self.admin = msg.sender
    self.pending_admin = empty(address)


@external
def set_stake(validator: address, stake_: uint256):
    """Admin: record a validator's stake (0 removes its weight in consensus)."""
    self._check_admin()
    self._check_nonzero(validator)
    log StakeSet(validator=validator, previous=self.stake[validator], stake=stake_)
    self.stake[validator] = stake_


@external
def pause():
    """Admin: stop settle (e.g. the settler key leaked). Claims stay open: they only pay what was posted."""
    self._check_admin()
    if self.paused:
        raw_revert(method_id("EnforcedPause()"))
    self.paused = True
    log Paused(account=msg.sender)


@external
def unpause():
    self._check_admin()
    if not self.paused:
        raw_revert(method_id("ExpectedPause()"))
    self.paused = False
    log Unpaused(account=msg.sender)


@internal
@view
def _check_admin():
    if msg.sender != self.admin:
        raw_revert(concat(method_id("NotAdmin(address)"), abi_encode(msg.sender)))


@internal
@pure
def _check_nonzero(account: address):
    if account == empty(address):
        raw_revert(method_id("ZeroAddress()"))


@internal
@pure
def _verify(proof: DynArray[bytes32, MAX_PROOF_DEPTH], root: bytes32, leaf: bytes32) -> bool:
    node: bytes32 = leaf
    for sibling: bytes32 in proof:
        # Sorted pairs: the smaller hash goes first, so proofs carry no left/right flags.
        if convert(node, uint256) < convert(sibling, uint256):
            node = keccak256(concat(node, sibling))
        else:
            node = keccak256(concat(sibling, node))
    return node == root
