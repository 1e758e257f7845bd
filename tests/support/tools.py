"""A function tool for tests of tool calls (structured output through the gateway, shadow checks of
tool calls in the cheater network, the validator's replay of a tool call's schema)."""

from __future__ import annotations

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"enum": ["Paris", "Rome"]}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}

# A tool whose argument the model writes freely (a string): its calls carry evidence of the model, where
# an enum's (WEATHER_TOOL's city) are one or two tokens of choice.
NOTE_TOOL = {
    "type": "function",
    "function": {
        "name": "save_note",
        "parameters": {
            "type": "object",
            "properties": {"text": {"type": "string", "maxLength": 40}},
            "required": ["text"],
            "additionalProperties": False,
        },
    },
}
