"""Parsing clients' JSON messages, the same way for every dialect and the REST API.

``json.loads`` alone is not enough for input from the network: besides ``JSONDecodeError`` it raises
``RecursionError`` for deeply nested arrays or objects and a plain ``ValueError`` for integers of
more than 4300 digits; it accepts ``NaN`` and ``Infinity``, which are not JSON and which strict peers
(and the gateway's own JSON responses) cannot write back; and it turns ``"\\ud800"`` escapes into lone
surrogates, which are not Unicode and make every later UTF-8 encoding (a NATS message, a protobuf
field, a call log) fail. :func:`parse_json` turns all of these into :class:`InvalidJson`.
"""

from __future__ import annotations

import json
import re

# A surrogate escape in the raw text (or a raw surrogate, possible only in-process) is the only way a
# lone surrogate can get into the parsed value, so the value is searched only when this matches.
_MAYBE_SURROGATE = re.compile(r"[\ud800-\udfff]|\\u[dD][89abcdefABCDEF]")
_SURROGATE = re.compile(r"[\ud800-\udfff]")


class InvalidJson(ValueError):
    """The text is not a JSON document this gateway accepts; the message says why."""


def _refuse_constant(name: str) -> object:
    raise InvalidJson(f"{name} is not a JSON value")


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
            integer too long to convert, ``NaN``/``Infinity``, or a lone surrogate in a string.
    """
    if isinstance(text, (bytes, bytearray)):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidJson("the text is not UTF-8") from None
    try:
        value = json.loads(text, parse_constant=_refuse_constant)
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
