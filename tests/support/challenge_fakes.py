"""What a validator (scoring.validator) challenges, and the nodes' answers, without a network: shared by
the validator's tests and its tests against hostile nodes."""

from __future__ import annotations

from cluster.records import NodeStats
from scoring.challenge_client import ChallengeResponse
from scoring.fakes import BigramModel, LetterCodec

OP = "0x" + "11" * 20
CODEC = LetterCodec()


def challenge_node(nid: str) -> NodeStats:
    """A live node `nid` serving model "default" (what a validator challenges)."""
    from eth_utils import to_checksum_address

    return NodeStats(
        node_id=nid,
        model_id="default",
        operator=to_checksum_address(OP),
        accelerator_type="cpu",
        capacity=4,
        live=True,
        running_replicas=1,
        joined_at=0.0,
    )


def fake_send(models: dict[str, BigramModel], inflate: set[str] = frozenset()):
    """A validator's `send`: each node answers with its own model; those in `inflate` overstate their
    completion tokens by 10."""

    async def send(req):
        model = models[req.node_id]
        prompt_ids = (
            CODEC.encode_chat(list(req.messages)) if req.messages else CODEC.encode_prompt(req.prompt)
        )
        ids, finish = model.generate(prompt_ids, req.max_tokens, req.temperature, seed=req.body.get("seed"))
        n = len(ids) + (10 if req.node_id in inflate else 0)
        return ChallengeResponse(
            ok=True,
            status=200,
            text=CODEC.decode(ids),
            token_ids=tuple(ids),
            completion_tokens=n,
            finish_reason=finish,
            ttft_s=0.01,
            elapsed_s=0.01 + max(n - 1, 1) * 0.005,  # every node streams at 200 tokens/s
        )

    return send
