"""Settlement benchmark: on-chain gas (settle per node count, claim) plus the off-chain figures.

    python -m benchmarks.settlement --out FILE.json [--quick]

Gas is measured on the embedded py-evm chain (eth-tester), the same EVM rules anvil runs (Prague),
with real roots: a reward tree of N operators and a usage tree of N interactions per epoch.
`gas_settle` is a steady-state settle (not the contract's first, which also initialises storage;
that one is reported as `gas_settle_first`). `gas_claim` is an operator's first claim with a proof
from the 1000-operator tree (its claimed/balance slots go from zero to non-zero: the expensive case);
`gas_claim_again` a later one; `gas_claim_first_ever` the contract's very first claim, which also
initialises totalSupply once.
`ledger_records_per_s` and `merkle_build_s` come from benchmarks.settlement_offchain. `--quick`
keeps the same keys (the 1,000,000-leaf build is skipped in --quick and reported as null).
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

from web3 import Web3

from settlement.chain import Chain
from settlement.keys import SettlerKey
from settlement.trees import find_reward_leaf, reward_tree

NODE_COUNTS = (10, 100, 1000)


def _settle(
    chain: Chain, key: SettlerKey, epoch: int, usage_root: bytes, reward_root: bytes, n: int, amount: int
):
    raw = chain.sign_settle(
        key, epoch, usage_root, reward_root, n, amount, chain.nonce(key.address), chain.fees()
    )
    receipt = chain.wait_receipt(chain.send_raw(raw))
    assert receipt is not None and receipt["status"] == 1, "settle reverted in the benchmark"
    return receipt["gasUsed"]


def measure_gas() -> dict:
    chain = Chain.embedded()
    settler = SettlerKey.generate()
    chain.fund(settler.address, 10**21)
    # Large totals below, and every epoch has ended (genesis 0, 1 s epochs): only gas is measured.
    chain.deploy(settler, first_epoch=0, emission_cap=10**27, genesis=0, epoch_length=1)
    out: dict = {"gas_settle": {}}
    operators = [SettlerKey.generate().address for _ in range(max(NODE_COUNTS))]
    cumulative: dict[str, int] = {}
    trees = {}
    for n in NODE_COUNTS:
        for i, op in enumerate(operators[:n]):
            cumulative[op] = cumulative.get(op, 0) + 10**18 + i
        trees[n] = reward_tree(cumulative)
    # Epoch 0 posts placeholder roots: a settle that rewrites a slot with the same value is cheaper.
    first = _settle(chain, settler, 0, Web3.keccak(text="usage-0"), Web3.keccak(text="rewards-0"), 10, 1)
    out["gas_settle_first"] = first
    total = 0
    for epoch, n in enumerate(NODE_COUNTS, start=1):
        total = sum(cumulative.values())
        out["gas_settle"][str(n)] = _settle(
            chain, settler, epoch, Web3.keccak(text=f"usage-{n}"), bytes.fromhex(trees[n].root[2:]), n, total
        )
    tree = trees[max(NODE_COUNTS)]
    payer = SettlerKey.generate()
    chain.fund(payer.address, 10**21)
    claims = []
    for op in operators[:2]:
        proof = [bytes.fromhex(p[2:]) for p in tree.get_proof(find_reward_leaf(tree, op))]
        claims.append(chain.claim(payer, op, cumulative[op], proof)["gasUsed"])
    # The contract's very first claim also turns totalSupply from 0 to non-zero (+17,100 once).
    out["gas_claim_first_ever"] = claims[0]
    out["gas_claim"] = claims[1]
    out["claim_proof_depth"] = len(tree.get_proof(0))
    # A later claim by the same operator (warm-ish: its claimed/balance slots are non-zero now).
    for op in operators[:1]:
        cumulative[op] += 5
    later = reward_tree(cumulative)
    _settle(
        chain,
        settler,
        len(NODE_COUNTS) + 1,
        Web3.keccak(text="usage-x"),
        bytes.fromhex(later.root[2:]),
        1,
        sum(cumulative.values()) - total,
    )
    proof = [bytes.fromhex(p[2:]) for p in later.get_proof(find_reward_leaf(later, operators[0]))]
    out["gas_claim_again"] = chain.claim(payer, operators[0], cumulative[operators[0]], proof)["gasUsed"]
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON output file")
    parser.add_argument("--quick", action="store_true", help="shorter run, same keys")
    args = parser.parse_args(argv)
    from rich.console import Console

    console = Console(stderr=True)
    with console.status("measuring gas on the embedded EVM"):
        result = measure_gas()
    console.log(f"gas: settle {result['gas_settle']}, claim {result['gas_claim']}")
    try:
        from benchmarks import settlement_offchain as off
    except ImportError:
        off = None
        console.log("benchmarks.settlement_offchain is missing: ledger/merkle figures are null")
    leaves = (100_000,) if args.quick else (100_000, 1_000_000)
    result["merkle_build_s"] = {"100000": None, "1000000": None}
    result["ledger_records_per_s"] = None
    if off is not None:
        with console.status("ledger ingest"):
            result["ledger_records_per_s"] = off.measure_ledger_records_per_s(
                50_000 if args.quick else 200_000
            )
        for n in leaves:
            with console.status(f"building a {n}-leaf usage tree"):
                result["merkle_build_s"][str(n)] = off.measure_merkle_build_s(n)
    result["machine"] = f"{platform.machine()}, {platform.python_version()}"
    result["quick"] = args.quick
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    console.log(json.dumps(result))


if __name__ == "__main__":
    main()
