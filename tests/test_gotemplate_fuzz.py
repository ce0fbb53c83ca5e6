"""Fuzz the Go template engine: any text, parsed and run, ends in output or GoTemplateError.

Two generators: token soup built from the language's own pieces (delimiters, keywords,
functions, literals, variables) and random edits of the corpus templates. Each case is parsed
and, when it parses, executed with small bounds against fixed secret data. Anything but a str
or a GoTemplateError (a RenderError) is a bug: an escaped KeyError, RecursionError,
IndexError... The step budget bounds every execution, so no case can hang.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agentd import gotemplate
from agentd.errors import RenderError

CORPUS = [p.read_text() for p in sorted((Path(__file__).parent / "fixtures" /
                                         "gotemplate").glob("*.tmpl"))]
SECRET = gotemplate.decode_json(
    '{"data": {"data": {"a": "x", "n": 5, "f": 1.5, "l": [1, "b", null], "m": {"k": [true]},'
    ' "e": "", "z": null}, "metadata": {"version": 1}}}')

TOKENS = [
    "{{", "}}", "{{- ", " -}}", "{{/*", "*/}}", " ", "\n", "(", ")", "|", ":=", "=", ",", ".",
    "$", "$x", "$y", "$x := ", "$i, $v := ", ".a", ".Data", ".data", ".l", ".m", ".k", ".n",
    '"s"', "`raw`", "'c'", "0", "1", "-1", "2.5", "1e3", "0x10", "1+2i", "nil", "true", "false",
    "if", "else", "else if", "with", "else with", "range", "end", "break", "continue",
    "define", "template", "block", '"t"', "and", "or", "not", "len", "index", "slice", "eq",
    "ne", "lt", "le", "gt", "ge", "print", "printf", "println", "html", "js", "urlquery",
    "call", '"%d %s %v %5.2f %q %x %!"', "secret", '"secret/data/a"', "secrets", '"kv/"',
    "pkiCert", "toJSON", "toJSONPretty", "split", "join", '","', "add", "subtract", "divide",
    "modulo", "multiply", "maximum", "minimum", "parseJSON", "parseInt", "parseFloat",
    "parseBool", "base64Decode", "base64Encode", "replaceAll", "contains", "in",
    "containsAny", "scratch", ".Set", ".Get", ".MapSet", ".MapValues", "executeTemplate",
    "timestamp", "env", '"HOME"', "loop", "range loop 3", "sha256Hex", "toTitle", "trimSpace",
    "plugin", "x", "999",
    "9223372036854775808", "\t", "}", "{", "-",
]


def lookup(path: str, kv: Any) -> Any:
    if path.endswith("/"):
        return {"data": {"keys": ["b", "a"]}}
    return SECRET


def check(text: str, missing_key: str = "zero") -> None:
    try:
        tmpl = gotemplate.parse(text, name="fuzz.tmpl", missing_key=missing_key)
    except gotemplate.GoTemplateError as exc:
        assert exc.template == "fuzz.tmpl"
        return
    try:
        out = tmpl.execute(lookup, max_output=20_000, max_steps=20_000, env={})
    except RenderError as exc:
        assert isinstance(exc, gotemplate.GoTemplateError)
        return
    assert isinstance(out, str)
    assert len(out) <= 20_000


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(st.sampled_from(TOKENS), st.text(max_size=4)), max_size=40),
       st.sampled_from(["zero", "error", "default"]))
def test_token_soup(parts: list[str], missing_key: str) -> None:
    check("".join(parts), missing_key)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.sampled_from(TOKENS), max_size=30))
def test_token_soup_in_one_action(parts: list[str]) -> None:
    check("{{ " + " ".join(parts) + " }}")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(CORPUS), st.lists(
    st.tuples(st.integers(0, 10_000), st.integers(0, 12), st.sampled_from([*TOKENS, ""])),
    min_size=1, max_size=4))
def test_corpus_mutations(base: str, edits: list[tuple[int, int, str]]) -> None:
    text = base
    for pos, cut, insert in edits:
        pos %= len(text) + 1
        text = text[:pos] + insert + text[pos + cut:]
    check(text)


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=200))
def test_arbitrary_text(text: str) -> None:
    check(text)
    check("{{" + text + "}}")


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=4),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(CORPUS), st.dictionaries(st.sampled_from(
    ["data", "lease_duration", "warnings", "auth", "request_id", "keys"]), JSON_VALUES,
    max_size=4))
def test_corpus_with_arbitrary_secret_data(text: str, reply: dict[str, Any]) -> None:
    """Any shape of upstream reply: the corpus renders or fails as a template error."""
    for delims in (("{{", "}}"), ("[[", "]]")):
        try:
            tmpl = gotemplate.parse(text, name="fuzz.tmpl", left_delim=delims[0],
                                    right_delim=delims[1], env_allow={"GOTMPL_ORACLE_VAR"},
                                    missing_key="zero")
        except gotemplate.GoTemplateError:
            continue
        with contextlib.suppress(gotemplate.GoTemplateError):
            tmpl.execute(lambda path, kv: reply, max_output=50_000, max_steps=50_000, env={})
