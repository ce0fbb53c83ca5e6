"""JSON numbers keep their text from the upstream's reply through the cache, the snapshot and
the render worker (decision 13): ``1e3`` reaches a Go template as ``1e3``, a Jinja2 template and
a v1 ``get`` as the float ``1000.0``. The end-to-end check against the OpenBao Agent itself is
tests/test_gotemplate_oracle.py (``93-json-number-texts.tmpl``) and
tests/test_gotemplate_agent.py."""

from __future__ import annotations

import json
import math
from types import MappingProxyType

import msgpack
import pytest

from agentd import jsonnum
from agentd.gotemplate.values import JsonNumber, to_go

BIG = "123456789012345678901234567890"
REPLY = (b'{"thousand": 1e3, "trailing": 1.50, "tenth": 0.10, "hundred": 1E+2, "negzero": -0.0,'
         b' "pi": 3.141592653589793238462643, "big": ' + BIG.encode() + b', "negbig": -' +
         BIG.encode() + b', "minus_zero": -0, "one": 1.0, "huge": 1e400, "port": 5432,'
         b' "ratio": 0.25, "exp": 1.5e+300, "name": "x", "list": [1e3, 2, "s"],'
         b' "nested": {"k": 0.10}}')
TEXTS = {"thousand": "1e3", "trailing": "1.50", "tenth": "0.10", "hundred": "1E+2",
         "negzero": "-0.0", "pi": "3.141592653589793238462643", "big": BIG, "negbig": "-" + BIG,
         "minus_zero": "-0", "one": "1.0", "huge": "1e400", "port": "5432", "ratio": "0.25",
         "exp": "1.5e+300"}
PLAIN = json.loads(REPLY)        # what Jinja2 templates and v1 clients see: Python's numbers


def test_loads_keeps_a_numbers_text_only_where_python_would_lose_it() -> None:
    data = jsonnum.loads(REPLY)
    assert data == PLAIN
    for key, text in TEXTS.items():
        assert (jsonnum.literal_text(data[key]) or str(data[key])) == text, key
    # plain where the value gives the text back: nothing changes for them
    for key in ("port", "ratio", "exp", "big", "negbig"):
        assert type(data[key]) in (int, float), key
    assert type(data["list"][1]) is int and jsonnum.literal_text(data["list"][0]) == "1e3"
    assert isinstance(data["thousand"], float) and data["thousand"] == 1000.0
    assert isinstance(data["minus_zero"], int) and data["minus_zero"] == 0
    with pytest.raises(ValueError):
        jsonnum.loads(b'{"x": NaN}')


def test_plain_numbers_are_exactly_what_go_prints_of_them() -> None:
    """The rule "plain where the value gives the text back" is the Go engine's own printing
    of a plain number (gotemplate.values.to_go), so a plain number loses nothing."""
    for text in ("0", "5432", "-17", "0.25", "1.5e+300", "1e+22", "123.456", BIG, "1e-07",
                 "0.1", "-2.5"):
        value = jsonnum.number(text)
        assert type(value) in (int, float), text
        assert to_go(value) == JsonNumber(text)
    for text in ("1e3", "1.50", "0.10", "1E+2", "-0.0", "-0", "1.0", "100.0", "1e22", "1e-7",
                 "3.141592653589793238462643", "1e400"):
        assert jsonnum.literal_text(jsonnum.number(text)) == text


def test_packing_round_trips_exactly_and_plainly() -> None:
    data = jsonnum.loads(REPLY)
    packed = jsonnum.packb(MappingProxyType(data))
    exact = jsonnum.unpackb(packed)
    assert exact == PLAIN
    assert {k: jsonnum.literal_text(exact[k]) or str(exact[k]) for k in TEXTS} == TEXTS
    assert jsonnum.holds_text(packed)
    plain = jsonnum.unpackb_plain(packed)
    assert plain == PLAIN
    assert all(type(v) in (int, float, str, list, dict) for v in plain.values())
    # v1's wire form: plain msgpack numbers; only an integer beyond 64 bits stays ext 1
    wire = msgpack.unpackb(jsonnum.plain_packed(packed), raw=False)
    assert wire["thousand"] == 1000.0 and type(wire["thousand"]) is float
    assert wire["big"] == msgpack.ExtType(jsonnum.EXT_JSON_NUMBER, BIG.encode())
    # a value without kept texts packs exactly as plain msgpack did before
    assert jsonnum.packb({"a": 0.25, "b": [1, "x"]}) == msgpack.packb({"a": 0.25, "b": [1, "x"]})
    assert not jsonnum.holds_text(jsonnum.packb({"a": 0.25}))


def test_dumps_writes_each_number_as_the_upstream_wrote_it() -> None:
    data = jsonnum.loads(REPLY)
    assert jsonnum.dumps(data) == REPLY.decode().replace(": ", ":").replace(", ", ",")
    assert jsonnum.dumps({"s": "h\u00e9 \"q\" <"}) == '{"s":"h\u00e9 \\"q\\" <"}'
    with pytest.raises(ValueError):
        jsonnum.dumps({"x": math.nan})
