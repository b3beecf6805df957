"""OpenAI function calling, by grammar: `tools` with `tool_choice` "required" or a named function.

The answer is constrained (runtime/constraint.py) to `{"name": ..., "arguments": {...}}` where the
name is one of the offered functions (the named one) and the arguments match that function's
`parameters` schema, so a call always parses and always fits; the server returns it as
`tool_calls` with finish_reason "tool_calls". The functions are described to the model in the
system message. `tool_choice` "auto" would let the model choose between text and a call, which
needs a chat template with a tool format: the bundles served here have none, so it is refused
with a 400 naming `tool_choice` (as is "auto" by default when `tools` is given without one);
"none" serves the request without tools.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from runtime.constraint import Constraint

from .openai_api import ApiError

NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
MAX_TOOLS = 32


@dataclass(frozen=True)
class Tools:
    functions: list[dict[str, Any]]  # {"name", "description", "parameters"}
    constraint: Constraint

    def system(self, system: str | None) -> str:
        """The system message with the functions described after it."""
        shown = [{k: v for k, v in f.items() if v} for f in self.functions]  # no empty descriptions
        listing = json.dumps(shown, ensure_ascii=False, separators=(",", ":"))
        text = (
            'Answer by calling one of these functions, as JSON {"name": ..., "arguments": {...}}:\n' + listing
        )
        return f"{system}\n\n{text}" if system else text


def parse_tools(body: dict[str, Any]) -> Tools | None:
    """`tools` and `tool_choice` of a request -> Tools, None (no tools, or tool_choice "none")."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    if tools is None:
        if choice not in (None, "none"):
            raise ApiError(400, "tool_choice needs tools", "tool_choice")
        return None
    if not isinstance(tools, list) or not 1 <= len(tools) <= MAX_TOOLS:
        raise ApiError(400, f"'tools' must be a list of 1 to {MAX_TOOLS} functions", "tools")
    functions = []
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        fn = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not NAME.fullmatch(fn["name"]):
            raise ApiError(
                400,
                f"{where} must be {{'type': 'function', 'function': {{'name': [A-Za-z0-9_-]{{1,64}}, ...}}}}",
                where,
            )
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise ApiError(400, f"{where}.function.parameters must be a JSON Schema object", where)
        functions.append(
            {"name": fn["name"], "description": str(fn.get("description", "")), "parameters": params}
        )
    names = [f["name"] for f in functions]
    if len(set(names)) != len(names):
        raise ApiError(400, "tools: function names must be distinct", "tools")
    if choice == "none":
        return None
    if choice in (None, "auto"):
        raise ApiError(
            400,
            "tool_choice 'auto' needs a chat template with a tool format, which this model's has not: "
            "pass tool_choice 'required' or {'type': 'function', 'function': {'name': ...}}",
            "tool_choice",
        )
    if choice != "required":
        named = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
        if not isinstance(choice, dict) or choice.get("type") != "function" or named not in names:
            raise ApiError(
                400,
                f"tool_choice must be 'none', 'required' or a function of tools (one of {names})",
                "tool_choice",
            )
        functions = [f for f in functions if f["name"] == named]
    calls = [
        {
            "type": "object",
            "properties": {"name": {"const": f["name"]}, "arguments": f["parameters"]},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for f in functions
    ]
    schema = calls[0] if len(calls) == 1 else {"anyOf": calls}
    return Tools(functions, Constraint.json_schema(schema))


def tool_calls(answer: str) -> list[dict[str, Any]]:
    """The constrained answer as OpenAI's tool_calls (arguments as JSON text, as OpenAI sends them)."""
    call = json.loads(answer)
    arguments = json.dumps(call["arguments"], ensure_ascii=False)
    return [
        {
            "id": f"call_{uuid.uuid4().hex[:24]}",
            "type": "function",
            "function": {"name": call["name"], "arguments": arguments},
        }
    ]
