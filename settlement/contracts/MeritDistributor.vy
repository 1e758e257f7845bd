# pragma version ~=0.4.3
"""
@title meritnet reward distributor
@notice The reward token plus cumulative Merkle claims. Once per epoch the settler posts the
        epoch's usage root (one leaf per interaction), the reward root (one leaf per operator:
        its cumulative reward up to this epoch) and the epoch's totals. An operator (or anyone
        on its behalf) claims its cumulative amount with a proof and is minted the difference
        to what it already claimed; a second claim of the same amount pays nothing.
        Two roles, so no single key can bend settlement: the settler (a hot key) posts epochs, at
        most `emission_cap` each, fixed at deploy; the admin (a cold key, meant for a multisig)
        may veto a pending root, pause settle and claim, and rotate both roles, each in two steps
        (proposed, then accepted by the new key), so a mistyped address can never take a role.
        Epochs are tied to time: epoch e can be settled only once it has ended (block.timestamp >=
        genesis + (e + 1) * epoch_length), never ahead of time.
        The threat: each reward root is cumulative and replaces the last, so a leaked settler key
        could post one root within the cap that pays itself every unclaimed reward, and claim it
        at once. Hence optimistic roots (as Merkl's dispute period): a posted reward root is
        pending for `claim_delay` seconds (immutable) before claims verify against it; until then
        they verify against the root before it, and the admin may `veto` it, which takes its
        epoch back whole (next_epoch, total_rewarded and its usage root), to be settled again.
        One root at most is pending: settle refuses while one is (RootPending), so a veto takes
        back exactly one epoch, and an epoch must last longer than the delay.
        The bound: a leaked settler key gets nothing if the admin vetoes each of its roots within
        `claim_delay` of its settle (then pauses and rotates the settler: the key could post the
        epoch again); a root the admin lets pass pays at most what the settlements posted.
        The admin also keeps the validators' stake record (`stake`), which consensus reads: a
        validator's weight in Yuma is what the admin recorded, never what the validator reports.
@dev Supply model: mint on claim, capped by what the claimable settlements posted (totalSupply <=
     total_rewarded, less a pending epoch's reward), so settle() touches no balance and costs the
     same whatever the claims did (constant gas).
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
# Seconds a posted reward root stays pending (vetoable, not yet claimable); 0 = claimable at once.
claim_delay: public(immutable(uint256))

admin: public(address)
pending_admin: public(address)
settler: public(address)
pending_settler: public(address)
paused: public(bool)
next_epoch: public(uint256)
usage_root: public(HashMap[uint256, bytes32])
# Everything settled, a pending epoch's reward included.
total_rewarded: public(uint256)
# The last reward root posted (epoch next_epoch - 1) and its epoch's reward. Claims verify against
# it from claimable_at on; before that it is pending: the admin may veto it, and claims verify
# against previous_root (claimable_at 0: nothing posted since the last veto).
latest_root: public(bytes32)
latest_reward: public(uint256)
claimable_at: public(uint256)
previous_root: public(bytes32)
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
    claimable_at: uint256


event RootVetoed:
    epoch: indexed(uint256)
    reward_root: bytes32
    epoch_reward: uint256


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
    claim_delay_: uint256,
):
    reward_token.__init__(name_, symbol_)
    self._check_nonzero(admin_)
    self._check_nonzero(settler_)
    if epoch_length_ == 0:
        raw_revert(method_id("ZeroEpochLength()"))
    emission_cap = emission_cap_
    genesis = genesis_
    epoch_length = epoch_length_
    claim_delay = claim_delay_
    self.admin = admin_
    self.settler = settler_
    self.next_epoch = first_epoch
    log AdminChanged(previous=empty(address), admin=admin_)
    log SettlerChanged(previous=empty(address), settler=settler_)


@external
def settle(
    epoch: uint256, usage_root_: bytes32, reward_root_: bytes32, interactions: uint256, epoch_reward: uint256
):
    """Post one epoch once it has ended; its reward root is pending for claim_delay. Epochs are
    strictly sequential, so a settled epoch is never rewritten (only vetoed while pending)."""
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
    # One pending root at a time, so a veto takes back exactly one epoch.
    pending_until: uint256 = self.claimable_at
    if block.timestamp < pending_until:
        raw_revert(concat(method_id("RootPending(uint256,uint256)"), abi_encode(epoch - 1, pending_until)))
    total: uint256 = self.total_rewarded + epoch_reward
    until: uint256 = block.timestamp + claim_delay
    self.next_epoch = epoch + 1
    self.usage_root[epoch] = usage_root_
    self.total_rewarded = total
    self.previous_root = self.latest_root  # claimable now: its window has passed
    self.latest_root = reward_root_
    self.latest_reward = epoch_reward
    self.claimable_at = until
    log EpochSettled(
        epoch=epoch,
        usage_root=usage_root_,
        reward_root=reward_root_,
        interactions=interactions,
        epoch_reward=epoch_reward,
        total_rewarded=total,
        claimable_at=until,
    )


@external
def veto():
    """Admin: take back the pending reward root before it becomes claimable (e.g. one a leaked
    settler key posted). Its epoch is undone whole and is settled again: next_epoch, its usage
    root and total_rewarded (with it, what the epoch may pay under the cap) are as before it."""
    self._check_admin()
    pending_until: uint256 = self.claimable_at
    if block.timestamp >= pending_until:
        raw_revert(concat(method_id("NoPendingRoot(uint256)"), abi_encode(pending_until)))
    epoch: uint256 = self.next_epoch - 1
    reward: uint256 = self.latest_reward
    log RootVetoed(epoch=epoch, reward_root=self.latest_root, epoch_reward=reward)
    self.next_epoch = epoch
    self.usage_root[epoch] = empty(bytes32)
    self.total_rewarded -= reward
    self.latest_root = self.previous_root
    self.latest_reward = 0
    self.claimable_at = 0


@external
def claim(account: address, cumulative: uint256, proof: DynArray[bytes32, MAX_PROOF_DEPTH]):
    """Mint `account` the part of its cumulative reward it has not claimed yet, proven against the
    claimable root (never a pending one)."""
    if self.paused:
        raw_revert(method_id("EnforcedPause()"))
    already: uint256 = self.claimed[account]
    if cumulative <= already:
        raw_revert(concat(method_id("NothingToClaim(address,uint256)"), abi_encode(account, already)))
    leaf: bytes32 = keccak256(keccak256(abi_encode(account, cumulative)))
    root: bytes32 = empty(bytes32)
    claimable: uint256 = 0
    root, claimable = self._claimable()
    if not self._verify(proof, root, leaf):
        # A proof of the pending root: say when it becomes claimable rather than "invalid".
        pending_until: uint256 = self.claimable_at
        if block.timestamp < pending_until and self._verify(proof, self.latest_root, leaf):
            raw_revert(
                concat(
                    method_id("RootPending(uint256,uint256)"), abi_encode(self.next_epoch - 1, pending_until)
                )
            )
        raw_revert(concat(method_id("InvalidProof(address,uint256)"), abi_encode(account, cumulative)))
    amount: uint256 = cumulative - already
    # Defence in depth: a bad root can never mint more than the claimable settlements posted.
    if reward_token._total_supply() + amount > claimable:
        raw_revert(concat(method_id("ExceedsRewarded(uint256)"), abi_encode(amount)))
    self.claimed[account] = cumulative
    reward_token._mint(account, amount)
    log Claimed(account=account, cumulative=cumulative, amount=amount)


@external
@view
def reward_root() -> bytes32:
    """The root claims verify against now: the latest one once its veto window has passed."""
    root: bytes32 = empty(bytes32)
    claimable: uint256 = 0
    root, claimable = self._claimable()
    return root


@internal
@view
def _claimable() -> (bytes32, uint256):
    """The root claims verify against and the total they may mint, both without a pending epoch."""
    if block.timestamp < self.claimable_at:
        return self.previous_root, self.total_rewarded - self.latest_reward
    return self.latest_root, self.total_rewarded


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
    """Admin: stop settle and claim (e.g. the settler key leaked). A pending root's window still
    runs: veto it in time."""
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
