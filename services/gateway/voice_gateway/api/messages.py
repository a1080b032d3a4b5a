"""Parsing clients' JSON messages, the same way for every dialect and the REST API.

``json.loads`` alone is not enough for input from the network: besides ``JSONDecodeError`` it raises
``RecursionError`` for deeply nested arrays or objects and a plain ``ValueError`` for integers of
more than 4300 digits; it accepts ``NaN`` and ``Infinity``, which are not JSON and which strict peers
(and the gateway's own JSON responses) cannot write back; and it turns ``"\\ud800"`` escapes into lone
surrogates, which are not Unicode and make every later UTF-8 encoding (a NATS message, a protobuf
field, a call log) fail. :func:`parse_json` turns all of these into :class:`InvalidJson`.

One number policy holds for every message: a number is accepted only if it can be written back as
JSON and carried by the gateway's own formats. A float must be finite once parsed (``1e400`` would
be infinity, which no strict peer can read back); an integer must fit a signed 64-bit integer
(protobuf ``int64``, OTLP attributes). Anything else is refused, never rounded or clamped.
"""

from __future__ import annotations

import json
import math
import re

# A surrogate escape in the raw text (or a raw surrogate, possible only in-process) is the only way a
# lone surrogate can get into the parsed value, so the value is searched only when this matches.
_MAYBE_SURROGATE = re.compile(r"[\ud800-\udfff]|\\u[dD][89abcdefABCDEF]")
_SURROGATE = re.compile(r"[\ud800-\udfff]")
INT_MIN, INT_MAX = -(2**63), 2**63 - 1
# A quoted number in an error message is cut to this many characters.
_SHOWN_DIGITS = 24


class InvalidJson(ValueError):
    """The text is not a JSON document this gateway accepts; the message says why."""


def _refuse_constant(name: str) -> object:
    raise InvalidJson(f"{name} is not a JSON value")


def _shown(text: str) -> str:
    return text if len(text) <= _SHOWN_DIGITS else text[:_SHOWN_DIGITS] + "..."


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise InvalidJson(f"the number {_shown(text)} is out of range (it must be a finite 64-bit float)")
    return value


def _parse_int(text: str) -> int:
    # The length check comes first: int() of thousands of digits is slow, and over 4300 it raises.
    if len(text.lstrip("-")) > 19 or not INT_MIN <= int(text) <= INT_MAX:
        raise InvalidJson(f"the integer {_shown(text)} is out of range (it must fit a signed 64-bit integer)")
    return int(text)


def _has_lone_surrogate(value: object) -> bool:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item):
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def parse_json(text: str | bytes) -> object:
    """The JSON value in ``text``.

    Args:
        text: One message as received (``bytes`` must be UTF-8).

    Returns:
        The decoded value (any JSON type; the caller checks its shape).

    Raises:
        InvalidJson: Malformed JSON or UTF-8, nesting deeper than the interpreter's recursion limit, an
            integer outside the signed 64-bit range, a float that overflows to infinity,
            ``NaN``/``Infinity``, or a lone surrogate in a string.
    """
    if isinstance(text, (bytes, bytearray)):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidJson("the text is not UTF-8") from None
    try:
        value = json.loads(text, parse_constant=_refuse_constant, parse_float=_parse_float, parse_int=_parse_int)
    except InvalidJson:
        raise
    except json.JSONDecodeError as exc:
        raise InvalidJson(f"{exc.msg} at position {exc.pos}") from None
    except RecursionError:
        raise InvalidJson("nested too deeply") from None
    except ValueError as exc:
        raise InvalidJson(str(exc)) from None
    if _MAYBE_SURROGATE.search(text) and _has_lone_surrogate(value):
        raise InvalidJson("a string holds a lone surrogate (\\ud800-\\udfff), which is not Unicode")
    return value
