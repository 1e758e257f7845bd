"""Structured answers judged under their grammar (real xgrammar over the built-in model's tokenizer; a
scripted reference stands in for the engine): an honest node's forced JSON tokens pass though the model
would rather write text, a token the schema forbids or a cheap allowed token does not, and a JSON answer
cut short but reported as a natural stop is fraud."""

from __future__ import annotations

import json
from collections.abc import Sequence

import pytest

from cluster.model import build_default_model
from scoring.reference import HFCodec
from scoring.thresholds import VerifyThresholds
from scoring.verify import Claim, verify
from tests.support.tools import WEATHER_TOOL

SCHEMA = json.dumps({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]})
# "\n": the model's own first choice everywhere in this script, and never allowed in compact JSON (not
# even inside a string).
FREE_TEXT = 205


@pytest.fixture(scope="module")
def codec() -> HFCodec:
    return HFCodec.from_pretrained(build_default_model(0))


class ScriptedReference:
    """At every position the reference prefers a newline (FREE_TEXT at -0.05) and gives the emitted token
    -1.5, unless `script` gives that position's distribution."""

    def __init__(self, script: dict[int, dict[int, float]] | None = None) -> None:
        self.script = script or {}

    def prompt_logprobs(self, prompt_ids: Sequence[int], completion_ids: Sequence[int], top_k: int):
        return [
            self.script.get(t, {FREE_TEXT: -0.05, tok: -1.5} if tok != FREE_TEXT else {tok: -0.05})
            for t, tok in enumerate(completion_ids)
        ]


def _claim(
    codec: HFCodec, text: str, *, schema: str | None = SCHEMA, finish="stop", temperature=0.0
) -> Claim:
    ids = codec.encode(text)
    return Claim(
        prompt_token_ids=tuple(codec.encode_prompt("give me json")),
        text=text,
        completion_token_ids=tuple(ids),
        reported_completion_tokens=len(ids),
        finish_reason=finish,
        max_tokens=64,
        temperature=temperature,
        json_schema=schema,
    )


def test_forced_json_tokens_pass_under_the_grammar_and_fail_without_it(codec):
    honest = _claim(codec, '{"a":12}')
    v = verify(honest, ScriptedReference(), codec)
    # 'a', the only property's name, is the one token allowed after '{"': forced, so no evidence
    assert v.verdict == "pass" and v.flagged == 0 and v.n_tokens == 4
    # The same answer judged as free text: every token loses the unconstrained argmax by 1.45 nats.
    free = verify(honest.model_copy(update={"json_schema": None}), ScriptedReference(), codec)
    assert free.verdict != "pass" and free.flagged == 5


def test_a_token_the_schema_forbids_is_a_violation(codec):
    v = verify(_claim(codec, '{"a":"x"}'), ScriptedReference(), codec)
    assert v.verdict != "pass"
    assert any("outside the response format's grammar" in r for r in v.reasons)
    assert v.n_tokens == 3  # judging stops at the rejected token (position 3); 'a' was forced


def test_a_cheap_allowed_token_loses_to_the_best_allowed_one(codec):
    ids = codec.encode('{"a":7}')
    twelve = codec.encode('{"a":12}')[3]
    # At the value, the reference's best allowed token is "12"; the node wrote "7", 6 nats worse.
    script = {3: {FREE_TEXT: -0.01, twelve: -0.2, ids[3]: -6.2}}
    v = verify(_claim(codec, '{"a":7}'), ScriptedReference(script), codec)
    assert v.flagged == 1 and v.tokens[3].margin == pytest.approx(6.0)
    th = VerifyThresholds()
    assert v.tokens[3].margin > th.margin_tol and v.evidence.violations == 1


def test_json_cut_short_but_reported_as_a_natural_stop_is_fraud(codec):
    v = verify(_claim(codec, '{"a":12'), ScriptedReference(), codec)
    assert v.verdict == "fraud"
    assert any("would not stop" in r for r in v.reasons)
    # Cut by max_tokens instead ('length' at the limit) it is an honest answer.
    cut = _claim(codec, '{"a":12', finish="length").model_copy(update={"max_tokens": 4})
    assert verify(cut, ScriptedReference(), codec).verdict == "pass"


def test_sampled_forced_tokens_are_judged_over_the_allowed_tokens(codec):
    text = '{"a":12}'
    deep = {t: {FREE_TEXT: -0.01, tok: -60.0} for t, tok in enumerate(codec.encode(text))}
    v = verify(_claim(codec, text, temperature=0.7), ScriptedReference(deep), codec)
    assert v.verdict == "pass" and not v.replayed
    free = _claim(codec, text, temperature=0.7, schema=None)
    assert verify(free, ScriptedReference(deep), codec).flagged == 5  # below the floor as free text


def test_json_object_and_a_codec_without_grammar(codec):
    from cluster.structured import JSON_OBJECT_SCHEMA
    from scoring.fakes import LetterCodec

    any_object = _claim(codec, '{"b":"x"}', schema=JSON_OBJECT_SCHEMA)
    assert verify(any_object, ScriptedReference(), codec).verdict == "pass"
    letters = LetterCodec()
    claim = Claim(
        prompt_token_ids=(0, 2),
        text="ab",
        reported_completion_tokens=2,
        max_tokens=2,
        finish_reason="length",
        json_schema=JSON_OBJECT_SCHEMA,
    )
    with pytest.raises(ValueError, match="no grammar"):  # the validator counts it as no verdict
        verify(claim, ScriptedReference(), letters)


WEATHER = WEATHER_TOOL["function"]["parameters"]


def _tool_claim(codec: HFCodec, text: str, mode: str, calls) -> Claim:
    from vllm.tool_parsers.utils import get_json_schema_from_tools

    from cluster.records import ToolUse

    tool = WEATHER_TOOL
    schema = WEATHER if mode == "named" else get_json_schema_from_tools("required", [_tool_param(tool)])
    use = ToolUse(mode=mode, name="get_weather" if mode == "named" else None, tools=(tool,), calls=calls)
    # the client's text (the gateway's Tally) is the calls' names and arguments: vLLM sends no content
    shown = "".join(name + args for name, args in calls)
    return _claim(codec, text, schema=json.dumps(schema)).model_copy(update={"tool_use": use, "text": shown})


def _tool_param(tool: dict):
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionToolsParam

    return ChatCompletionToolsParam.model_validate(tool)


@pytest.mark.parametrize(
    ("mode", "text", "honest", "lie"),
    [
        (
            "named",
            '{"city":"Rome"}',
            (("get_weather", '{"city":"Rome"}'),),
            (("get_weather", '{"city":"Paris"}'),),
        ),
        (
            "required",
            '[{"name":"get_weather","parameters":{"city":"Rome"}}]',
            (("get_weather", '{"city": "Rome"}'),),  # vLLM re-dumps a required call's parameters
            (("get_weather", '{"city": "Rome"}'), ("get_weather", '{"city": "Paris"}')),
        ),
    ],
)
def test_a_tool_call_passes_when_the_client_got_what_the_ids_say(codec, mode, text, honest, lie):
    v = verify(_tool_claim(codec, text, mode, honest), ScriptedReference(), codec)
    assert v.verdict == "pass", v.reasons
    lied = verify(_tool_claim(codec, text, mode, lie), ScriptedReference(), codec)
    assert lied.verdict == "fraud" and "tool calls the client got" in lied.reasons[0]


def test_tokens_the_schema_forces_are_not_counted_as_evidence(codec):
    """Where the grammar allows one token only, the node had no choice: such tokens neither clear nor
    convict it (a cheater cannot pad its record with them). A single-value enum forces the text, but not
    every token: '1' then '2' would spell 12 too, so '12' still counts."""
    only = json.dumps({"type": "object", "properties": {"a": {"enum": [12]}}, "required": ["a"]})
    v = verify(_claim(codec, '{"a":12}', schema=only), ScriptedReference(), codec)
    assert v.verdict == "pass" and v.n_tokens < 5
    forced = codec.grammar().walk(only, codec.encode('{"a":12}'))
    assert v.n_tokens == sum(not forced.is_forced(t) for t in range(5))


def test_content_beside_tool_calls_and_arguments_of_another_type_are_fraud(codec):
    honest = _tool_claim(codec, '{"city":"Rome"}', "named", (("get_weather", '{"city":"Rome"}'),))
    chatty = honest.model_copy(update={"text": "Sure! " + honest.text})
    assert "content is not what" in verify(chatty, ScriptedReference(), codec).reasons[0]
    from cluster.structured import tool_calls_match

    text = '[{"name":"f","parameters":{"n":true}}]'
    assert tool_calls_match("required", None, text, (("f", '{"n": true}'),))
    assert not tool_calls_match("required", None, text, (("f", '{"n": 1}'),))  # 1 == True in Python


def _auto_claim(codec: HFCodec, text: str, shown: str, calls) -> Claim:
    from cluster.records import ToolUse

    use = ToolUse(mode="auto", parser="pythonic", tools=(WEATHER_TOOL,), calls=calls)
    return _claim(codec, text, schema=None).model_copy(update={"tool_use": use, "text": shown})


def _agreeing(codec: HFCodec, text: str) -> ScriptedReference:
    """A reference whose argmax is every token of `text` (the node's answer is the model's own)."""
    return ScriptedReference({t: {tok: -0.1} for t, tok in enumerate([*codec.encode(text), 1])})


def test_an_auto_tool_call_is_what_the_nodes_parser_reads_in_the_text(codec):
    """tool_choice auto: the validator runs the nodes' tool parser (vLLM's pythonic) over the node's text;
    the client must have got exactly its calls and content."""
    call = '[get_weather(city="Rome")]'
    honest = _auto_claim(codec, call, 'get_weather{"city": "Rome"}', (("get_weather", '{"city": "Rome"}'),))
    assert verify(honest, _agreeing(codec, call), codec).verdict == "pass"
    paris = honest.model_copy(update={"text": 'get_weather{"city": "Paris"}'})
    paris = paris.model_copy(
        update={
            "tool_use": paris.tool_use.model_copy(update={"calls": (("get_weather", '{"city": "Paris"}'),)})
        }
    )
    assert "tool calls the client got" in verify(paris, _agreeing(codec, call), codec).reasons[0]
    prose = "It is sunny."
    plain = _auto_claim(codec, prose, prose, ())
    assert verify(plain, _agreeing(codec, prose), codec).verdict == "pass"
    invented = _auto_claim(
        codec, prose, prose + 'get_weather{"city": "Rome"}', (("get_weather", '{"city": "Rome"}'),)
    )
    assert verify(invented, _agreeing(codec, prose), codec).verdict == "fraud"
