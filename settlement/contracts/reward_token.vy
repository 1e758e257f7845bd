# pragma version ~=0.4.3
"""
@title meritnet reward token (ERC-20 module)
@notice The balances of the reward token. Only the contract that initializes this module can
        mint (the distributor mints on claim, never on its own say-so).
@dev Errors are ERC-6093 custom errors (the ones OpenZeppelin's ERC20 uses), raised with
     raw_revert because Vyper 0.4 has no `error` declarations; the bytes are identical to
     Solidity's, so standard tools decode them.
"""

from ethereum.ercs import IERC20

implements: IERC20

# 18 decimals: amounts are wei-like integers, the same unit the off-chain rewards are computed in.
DECIMALS: constant(uint8) = 18

name: public(immutable(String[32]))
symbol: public(immutable(String[8]))
balanceOf: public(HashMap[address, uint256])
allowance: public(HashMap[address, HashMap[address, uint256]])
# Supply plus one. The slot starts non-zero (set at deploy), so the first mint ever rewrites a
# non-zero slot (~5k gas) instead of creating one (~20k): the first claim on a fresh contract then
# costs what every operator's first claim costs. totalSupply() subtracts the one back.
_supply_plus_one: uint256


@deploy
def __init__(name_: String[32], symbol_: String[8]):
    name = name_
    symbol = symbol_
    self._supply_plus_one = 1


@external
@view
def totalSupply() -> uint256:
    return self._supply_plus_one - 1


@internal
@view
def _total_supply() -> uint256:
    return self._supply_plus_one - 1


@external
@view
def decimals() -> uint8:
    return DECIMALS


@external
def transfer(receiver: address, amount: uint256) -> bool:
    self._transfer(msg.sender, receiver, amount)
    return True


@external
def approve(spender: address, amount: uint256) -> bool:
    self.allowance[msg.sender][spender] = amount
    log IERC20.Approval(owner=msg.sender, spender=spender, value=amount)
    return True


@external
def transferFrom(owner: address, receiver: address, amount: uint256) -> bool:
    allowed: uint256 = self.allowance[owner][msg.sender]
    # An allowance of max_value(uint256) means "unlimited" and is never decreased (as in OpenZeppelin).
    if allowed != max_value(uint256):
        if allowed < amount:
            raw_revert(
                concat(
                    method_id("ERC20InsufficientAllowance(address,uint256,uint256)"),
                    abi_encode(msg.sender, allowed, amount),
                )
            )
        self.allowance[owner][msg.sender] = allowed - amount
        log IERC20.Approval(owner=owner, spender=msg.sender, value=allowed - amount)
    self._transfer(owner, receiver, amount)
    return True


@internal
def _transfer(owner: address, receiver: address, amount: uint256):
    if receiver == empty(address):
        raw_revert(concat(method_id("ERC20InvalidReceiver(address)"), abi_encode(receiver)))
    balance: uint256 = self.balanceOf[owner]
    if balance < amount:
        raw_revert(
            concat(
                method_id("ERC20InsufficientBalance(address,uint256,uint256)"),
                abi_encode(owner, balance, amount),
            )
        )
    self.balanceOf[owner] = balance - amount
    self.balanceOf[receiver] += amount
    log IERC20.Transfer(sender=owner, receiver=receiver, value=amount)


@internal
def _mint(receiver: address, amount: uint256):
    self._supply_plus_one += amount
    self.balanceOf[receiver] += amount
    log IERC20.Transfer(sender=empty(address), receiver=receiver, value=amount)
