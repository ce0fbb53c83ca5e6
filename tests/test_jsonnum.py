"""JSON numbers keep their text from the upstream's reply through the cache, the snapshot and
the render worker (decision 14): ``1e3`` reaches a Go template as ``1e3``, a Jinja2 template and
a v1 ``get`` as the float ``1000.0``. The end-to-end check against the OpenBao Agent itself is
tests/test_gotemplate_oracle.py (``93-json-number-texts.tmpl``) and
tests/test_gotemplate_agent.py."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from types import MappingProxyType
from typing import Any

import msgpack
import pytest
import trio

from agentd import jsonnum
from agentd.cache import Cache
from agentd.crypto import KEY_BYTES, Sealer
from agentd.gotemplate.values import JsonNumber, to_go
from agentd.jsonnum import MAX_DEPTH
from agentd.render.pool import RenderWorker
from agentd.snapshot import FILE_NAME, FORMAT, Snapshot

FIXTURES = Path(__file__).parent / "fixtures" / "snapshot"
# Written by agentd before this change (format 1: Python floats), from this upstream reply:
# {"thousand": 1e3, "trailing": 1.50, "tenth": 0.10, "hundred": 1E+2, "negzero": -0.0,
#  "pi": 3.141592653589793238462643, "port": 5432, "ratio": 0.25, "name": "x"} (kv2 version 3)
OLD_NUMBERS = FIXTURES / "format1-numbers.snapshot"
FIXTURE_KEY = b"k" * KEY_BYTES

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


def test_a_bad_number_text_is_not_in_the_error() -> None:
    bad = msgpack.packb(msgpack.ExtType(jsonnum.EXT_JSON_NUMBER, b"s3cr3t"))
    for unpack in (jsonnum.unpackb, jsonnum.unpackb_plain):
        with pytest.raises(ValueError) as info:
            unpack(bad)
        assert "s3cr3t" not in str(info.value)


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


def test_the_cache_keeps_texts_sealed_and_hands_v1_the_plain_form() -> None:
    cache = Cache()
    assert cache.put("n", jsonnum.loads(REPLY), version=1)
    got = cache.get("n")
    assert got is not None
    assert jsonnum.literal_text(got.data["thousand"]) == "1e3"
    assert jsonnum.literal_text(got.data["nested"]["k"]) == "0.10"
    assert got.data["big"] == int(BIG)
    opened = cache.get_packed("n")
    assert opened is not None
    assert msgpack.unpackb(opened[0], raw=False, ext_hook=jsonnum.plain_ext_hook) == PLAIN
    exact = cache.get_packed("n", exact=True)
    assert exact is not None and jsonnum.holds_text(exact[0])
    # the same value again is no new version; the same number with other text is
    assert not cache.put("n", jsonnum.loads(REPLY), version=None)
    other = jsonnum.loads(REPLY.replace(b"1e3", b"1000.0"))
    assert other == PLAIN and cache.put("n", other, version=None)


async def test_the_snapshot_keeps_texts(tmp_path: Path) -> None:
    cache = Cache()
    cache.put("n", jsonnum.loads(REPLY), version=7)
    writer = Snapshot(tmp_path / FILE_NAME, Sealer(FIXTURE_KEY), host="h")
    assert await writer.flush(cache)
    restored = Cache()
    reader = Snapshot(tmp_path / FILE_NAME, Sealer(FIXTURE_KEY), host="h")
    assert reader.load_into(restored) == ["n"]
    got = restored.get("n")
    assert got is not None and got.version == 7 and got.stale
    assert {k: jsonnum.literal_text(got.data[k]) or str(got.data[k]) for k in TEXTS} == TEXTS
    opened = restored.get_packed("n")
    assert opened is not None
    assert msgpack.unpackb(opened[0], raw=False, ext_hook=jsonnum.plain_ext_hook) == PLAIN
    assert FORMAT == 2


def test_a_format_1_snapshot_with_python_floats_still_loads(tmp_path: Path) -> None:
    shutil.copy(OLD_NUMBERS, tmp_path / FILE_NAME)
    reader = Snapshot(tmp_path / FILE_NAME, Sealer(FIXTURE_KEY), host="fixture-host")
    cache = Cache()
    assert reader.load_into(cache) == ["nums"]
    got = cache.get("nums")
    assert got is not None and got.version == 3
    # the texts were lost before they were written: the values come back as they were
    assert dict(got.data) == {"thousand": 1000.0, "trailing": 1.5, "tenth": 0.1,
                              "hundred": 100.0, "negzero": -0.0, "pi": 3.141592653589793,
                              "port": 5432, "ratio": 0.25, "name": "x"}
    assert all(jsonnum.literal_text(v) is None for v in got.data.values())
    opened = cache.get_packed("nums")
    assert opened is not None and not jsonnum.holds_text(opened[0])


async def test_the_worker_gives_go_the_text_and_jinja_the_python_number() -> None:
    cache = Cache()
    cache.put("n", jsonnum.loads(REPLY), version=1)
    got = cache.get("n")
    assert got is not None
    data: dict[str, Any] = {"n": got.data}
    reply = {"kv/n": {"data": got.data}}
    go = {"name": "t", "left": "{{", "right": "}}", "missing_key": "error", "env_allow": []}
    worker = RenderWorker()
    try:
        with trio.fail_after(30):
            jinja = await worker.render(
                "{% set d = secret('n') %}{{ d.thousand }} {{ d.trailing }} {{ d.negzero }} "
                "{{ d.minus_zero }} {{ d.big }} {{ d.huge }} {{ d.thousand is float }} "
                "{{ d | tojson }}", data)
            gotext = await worker.render(
                '{{ with secret "kv/n" }}{{ .Data.thousand }} {{ .Data.trailing }} '
                "{{ .Data.negzero }} {{ .Data.minus_zero }} {{ .Data.big }} {{ .Data.huge }} "
                '{{ printf "%T" .Data.thousand }} {{ toJSON .Data.nested }}{{ end }}',
                reply, go=go)
    finally:
        await worker.aclose()
    expected_json = json.dumps(PLAIN, sort_keys=True)
    assert jinja.decode() == (f"1000.0 1.5 -0.0 0 {BIG} inf True " + expected_json)
    assert gotext.decode() == f'1e3 1.50 -0.0 -0 {BIG} 1e400 json.Number {{"k":0.10}}'


@pytest.mark.parametrize("depth", [1, MAX_DEPTH, MAX_DEPTH + 1, 3000])
def test_documents_nested_deeper_than_the_limit_are_not_json(depth: int) -> None:
    text = '{"a": ' * (depth - 1) + "[1]" + "}" * (depth - 1)
    if depth <= MAX_DEPTH:
        assert jsonnum.loads(text) is not None
    else:
        with pytest.raises(ValueError, match="nested deeper"):
            jsonnum.loads(text)
