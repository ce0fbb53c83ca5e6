"""Go's own text/template behaviour, case by case, with the outputs Go gives.

Cases are taken from Go's tests and docs and cite their source: ``src/text/template/
exec_test.go`` (execTests, cmpTests), ``src/text/template/parse/parse_test.go`` (errorTests),
``src/text/template/multi_test.go`` (multiExecTests) and the package documentation. Go's tests
use a struct ``T`` as data; here the same fields live in a map, which Go treats alike for these
cases. Errors are checked as Go's tests check them: a substring of the message.
"""

from __future__ import annotations

import contextlib
from typing import Any

import pytest

from agentd import gotemplate
from agentd.errors import RenderError
from agentd.gotemplate.values import NO_VALUE, Int64, JsonNumber

# exec_test.go's tVal, as a map (only the fields the cases below use)
T: dict[str, Any] = {
    "True": True, "I": 17, "U16": 16, "X": "x", "S": "xyz", "U": {"V": "v"},
    "SI": [3, 4, 5], "SICap": [0, 0, 0, 0, 0], "SIEmpty": [], "SB": [True, False],
    "MSI": {"one": 1, "two": 2, "three": 3}, "MSIone": {"one": 1}, "MSIEmpty": {},
    "Empty0": None, "Empty1": 3, "Empty2": "empty2", "Empty3": [7, 8],
    "Empty4": {"V": "UinEmpty"}, "PSI": [21, 22, 23], "PS": "a string",
}

EXEC_CASES: list[tuple[str, str, Any, str | None]] = [
    # exec_test.go execTests: (name, input, data, output or None for an error)
    ("empty", "", NO_VALUE, ""),
    ("text", "some text", NO_VALUE, "some text"),
    ("nil action", "{{nil}}", NO_VALUE, None),
    ("ideal int", "{{printf `%T %v` 3 3}}", NO_VALUE, "int 3"),
    ("ideal float", "{{printf `%T %v` 1.0 1.0}}", NO_VALUE, "float64 1"),
    ("ideal exp float", "{{printf `%T %v` 1e1 1e1}}", NO_VALUE, "float64 10"),
    ("ideal int hex", "{{printf `%T %v` 0x1F 0x1F}}", NO_VALUE, "int 31"),
    ("ideal char", "{{printf `%T %v` 'a' 'a'}}", NO_VALUE, "int 97"),
    ("ideal too big", "{{printf `%T` 9223372036854775808}}", NO_VALUE, None),
    ("$ int", "{{$}}", 123, "123"),
    ("$.I", "{{$.I}}", T, "17"),
    ("$.U.V", "{{$.U.V}}", T, "v"),
    ("declare in action", "{{$x := $.U.V}}{{$x}}", T, "v"),
    ("simple assignment", "{{$x := 2}}{{$x = 3}}{{$x}}", T, "3"),
    ("nested assignment", "{{$x := 2}}{{if true}}{{$x = 3}}{{end}}{{$x}}", T, "3"),
    ("nested assignment changes the last declaration",
     "{{$x := 1}}{{if true}}{{$x := 2}}{{if true}}{{$x = 3}}{{end}}{{end}}{{$x}}", T, "1"),
    ("dot int", "<{{.}}>", 13, "<13>"),
    ("dot string", "<{{.}}>", "hello", "<hello>"),
    ("dot slice", "<{{.}}>", [-1, -2, -3], "<[-1 -2 -3]>"),
    ("dot map", "<{{.}}>", {"two": 2, "one": 1}, "<map[one:1 two:2]>"),
    ("map .one", "{{.MSI.one}}", T, "1"),
    ("map .two", "{{.MSI.two}}", T, "2"),
    ("map .NO", "{{.MSI.NO}}", T, "<no value>"),
    ("map .WRONG args", "{{.MSI.one 1}}", T, None),
    ("empty nil", "{{.Empty0}}", T, "<no value>"),
    ("empty with int", "{{.Empty1}}", T, "3"),
    ("empty with string", "{{.Empty2}}", T, "empty2"),
    ("empty with slice", "{{.Empty3}}", T, "[7 8]"),
    ("empty with struct", "{{.Empty4}}", T, "map[V:UinEmpty]"),
    ("empty with struct, field", "{{.Empty4.V}}", T, "UinEmpty"),
    ("if true", "{{if true}}TRUE{{end}}", T, "TRUE"),
    ("if false", "{{if false}}TRUE{{else}}FALSE{{end}}", T, "FALSE"),
    ("if nil", "{{if nil}}TRUE{{end}}", T, None),
    ("if on typed nil interface value", "{{if .Empty0}}TRUE{{else}}FALSE{{end}}", T, "FALSE"),
    ("if 1", "{{if 1}}NON-ZERO{{else}}ZERO{{end}}", T, "NON-ZERO"),
    ("if 0", "{{if 0}}NON-ZERO{{else}}ZERO{{end}}", T, "ZERO"),
    ("if 1.5", "{{if 1.5}}NON-ZERO{{else}}ZERO{{end}}", T, "NON-ZERO"),
    ("if 0.0", "{{if .FloatZero}}NON-ZERO{{else}}ZERO{{end}}", {"FloatZero": 0.0}, "ZERO"),
    ("if emptystring", "{{if ``}}NON-EMPTY{{else}}EMPTY{{end}}", T, "EMPTY"),
    ("if string", "{{if `notempty`}}NON-EMPTY{{else}}EMPTY{{end}}", T, "NON-EMPTY"),
    ("if emptyslice", "{{if .SIEmpty}}NON-EMPTY{{else}}EMPTY{{end}}", T, "EMPTY"),
    ("if slice", "{{if .SI}}NON-EMPTY{{else}}EMPTY{{end}}", T, "NON-EMPTY"),
    ("if emptymap", "{{if .MSIEmpty}}NON-EMPTY{{else}}EMPTY{{end}}", T, "EMPTY"),
    ("if map", "{{if .MSI}}NON-EMPTY{{else}}EMPTY{{end}}", T, "NON-EMPTY"),
    ("if $x with $y int", "{{if $x := true}}{{with $y := .I}}{{$x}},{{$y}}{{end}}{{end}}", T,
     "true,17"),
    ("if $x with $x int", "{{if $x := true}}{{with $x := .I}}{{$x}},{{end}}{{$x}}{{end}}", T,
     "17,true"),
    ("if else if", "{{if false}}FALSE{{else if true}}TRUE{{end}}", T, "TRUE"),
    ("if else chain", "{{if eq 1 3}}1{{else if eq 2 3}}2{{else if eq 3 3}}3{{end}}", T, "3"),
    ("print", '{{print "hello, print"}}', T, "hello, print"),
    ("print 123", "{{print 1 2 3}}", T, "1 2 3"),
    ("print nil", "{{print nil}}", T, "<nil>"),
    ("println", "{{println 1 2 3}}", T, "1 2 3\n"),
    ("printf int", '{{printf "%04x" 127}}', T, "007f"),
    ("printf float", '{{printf "%g" 3.5}}', T, "3.5"),
    ("printf string", '{{printf "%s" "hello"}}', T, "hello"),
    ("printf dot", '{{with .I}}{{printf "%d" .}}{{end}}', T, "17"),
    ("printf var", '{{with $x := .I}}{{printf "%d" $x}}{{end}}', T, "17"),
    ("html", '{{html "<script>alert(\\"XSS\\");</script>"}}', T,
     "&lt;script&gt;alert(&#34;XSS&#34;);&lt;/script&gt;"),
    ("html pipeline", '{{printf "<script>alert(\\"XSS\\");</script>" | html}}', T,
     "&lt;script&gt;alert(&#34;XSS&#34;);&lt;/script&gt;"),
    ("html", "{{html .PS}}", T, "a string"),
    ("html untyped nil", "{{html .Empty0}}", T, "&lt;no value&gt;"),
    ("js", "{{js .}}", "It'd be nice.", "It\\'d be nice."),
    ("urlquery", '{{"http://www.example.org/"|urlquery}}', T,
     "http%3A%2F%2Fwww.example.org%2F"),
    ("not", "{{not true}} {{not false}}", T, "false true"),
    ("and", "{{and false 0}} {{and 1 0}} {{and 0 true}} {{and 1 1}}", T, "false 0 0 1"),
    ("or", "{{or 0 0}} {{or 1 0}} {{or 0 true}} {{or 1 1}}", T, "0 1 true 1"),
    ("boolean if", "{{if and true 1 `hi`}}TRUE{{else}}FALSE{{end}}", T, "TRUE"),
    ("boolean if not", "{{if and true 1 `hi` | not}}TRUE{{else}}FALSE{{end}}", T, "FALSE"),
    ("boolean if pipe", "{{if true | not | and 1}}TRUE{{else}}FALSE{{end}}", T, "FALSE"),
    ("slice[0]", "{{index .SI 0}}", T, "3"),
    ("slice[1]", "{{index .SI 1}}", T, "4"),
    ("slice[HUGE]", "{{index .SI 10}}", T, None),
    ("slice[WRONG]", "{{index .SI `hello`}}", T, None),
    ("map[one]", "{{index .MSI `one`}}", T, "1"),
    ("map[two]", "{{index .MSI `two`}}", T, "2"),
    ("nil[1]", "{{index nil 1}}", T, None),
    ("slice[:]", "{{slice .SI}}", T, "[3 4 5]"),
    ("slice[1:]", "{{slice .SI 1}}", T, "[4 5]"),
    ("slice[1:2]", "{{slice .SI 1 2}}", T, "[4]"),
    ("slice[-1:]", "{{slice .SI -1}}", T, None),
    ("slice[1:-2]", "{{slice .SI 1 -2}}", T, None),
    ("slice[1:2:-1]", "{{slice .SI 1 2 -1}}", T, None),
    ("slice[2:1]", "{{slice .SI 2 1}}", T, None),
    ("slice[2:2:1]", "{{slice .SI 2 2 1}}", T, None),
    ("out of range", "{{slice .SI 4 5}}", T, None),
    ("out of range", "{{slice .SI 2 2 5}}", T, None),
    ("len(s) < indexes < cap(s)", "{{slice .SICap 6 10}}", T, None),
    ("string[:]", "{{slice .S}}", T, "xyz"),
    ("string[0:1]", "{{slice .S 0 1}}", T, "x"),
    ("string[1:]", "{{slice .S 1}}", T, "yz"),
    ("string[1:2]", "{{slice .S 1 2}}", T, "y"),
    ("out of range", "{{slice .S 1 5}}", T, None),
    ("3-index slice of string", "{{slice .S 1 2 2}}", T, None),
    ("len of int", "{{len 3}}", T, None),
    ("len of slice", "{{len .SI}}", T, "3"),
    ("len of map", "{{len .MSI }}", T, "3"),
    ("len of string", "{{len `abc`}}", T, "3"),
    ("range []int", "{{range .SI}}-{{.}}-{{end}}", T, "-3--4--5-"),
    ("range empty no else", "{{range .SIEmpty}}-{{.}}-{{end}}", T, ""),
    ("range []int else", "{{range .SI}}-{{.}}-{{else}}EMPTY{{end}}", T, "-3--4--5-"),
    ("range empty else", "{{range .SIEmpty}}-{{.}}-{{else}}EMPTY{{end}}", T, "EMPTY"),
    ("range []int break else", "{{range .SI}}-{{.}}-{{break}}NOTREACHED{{else}}EMPTY{{end}}", T,
     "-3-"),
    ("range []int continue else",
     "{{range .SI}}-{{.}}-{{continue}}NOTREACHED{{else}}EMPTY{{end}}", T, "-3--4--5-"),
    ("range []bool", "{{range .SB}}-{{.}}-{{end}}", T, "-true--false-"),
    ("range []int method", "{{range .SI | .MAdd .I}}-{{.}}-{{end}}", T, None),
    ("range map", "{{range .MSI}}-{{.}}-{{end}}", T, "-1--3--2-"),
    ("range empty map no else", "{{range .MSIEmpty}}-{{.}}-{{end}}", T, ""),
    ("range map else", "{{range .MSI}}-{{.}}-{{else}}EMPTY{{end}}", T, "-1--3--2-"),
    ("range empty map else", "{{range .MSIEmpty}}-{{.}}-{{else}}EMPTY{{end}}", T, "EMPTY"),
    ("range empty interface", "{{range .Empty3}}-{{.}}-{{else}}EMPTY{{end}}", T, "-7--8-"),
    ("range empty nil", "{{range .Empty0}}-{{.}}-{{end}}", T, ""),
    ("range $x SI", "{{range $x := .SI}}<{{$x}}>{{end}}", T, "<3><4><5>"),
    ("range $x $y SI", "{{range $x, $y := .SI}}<{{$x}}={{$y}}>{{end}}", T, "<0=3><1=4><2=5>"),
    ("range $x MSIone", "{{range $x := .MSIone}}<{{$x}}>{{end}}", T, "<1>"),
    ("range $x $y MSIone", "{{range $x, $y := .MSIone}}<{{$x}}={{$y}}>{{end}}", T,
     "<one=1>"),
    ("range $x PSI", "{{range $x := .PSI}}<{{$x}}>{{end}}", T, "<21><22><23>"),
    ("declare in range", "{{range $x := .PSI}}<{{$foo:=$x}}{{$x}}>{{end}}", T,
     "<21><22><23>"),
    ("range int", "{{range 5}}{{.}}{{end}}", T, "01234"),
    ("range int $x", "{{range $x := 3}}<{{$x}}>{{end}}", T, "<0><1><2>"),
    ("range int two vars", "{{range $i, $x := 3}}{{end}}", T, None),
    ("range string", "{{range .S}}{{.}}{{end}}", T, None),
    ("range $i $x assign", "{{$i := 0}}{{$x := 0}}{{range $i, $x = .SI}}{{end}}{{$i}}{{$x}}",
     T, "25"),
    ("parens in pipeline", "{{printf `%d %d %d` (1) (2 | add 3) (add 4 (add 5 6))}}", T,
     "1 5 15"),
    ("parens: $ in paren", "{{($).X}}", T, "x"),
    ("parens: $.U in paren", "{{($.U).V}}", T, "v"),
    ("bug10", "{{.MSIone.one}}-{{(.MSIone).one}}", T, "1-1"),
    ("trim left", "x \r\n\t{{- 3}}", T, "x3"),
    ("trim right", "{{3 -}}\n\n\ty", T, "3y"),
    ("trim left and right", "x \r\n\t{{- 3 -}}\n\n\ty", T, "x3y"),
    ("trim with extra spaces", "x\n{{-  3   -}}\ny", T, "x3y"),
    ("comment trim left", "x \r\n\t{{- /* hi */}}", T, "x"),
    ("comment trim right", "{{/* hi */ -}}\n\n\ty", T, "y"),
    ("comment trim left and right", "x \r\n\t{{- /* */ -}}\n\n\ty", T, "xy"),
    ("block definition", '{{block "foo" .}}hello{{end}}', T, "hello"),
    ("with", "{{with true}}{{.}}{{end}}", T, "true"),
    ("with false", "{{with false}}{{.}}{{else}}FALSE{{end}}", T, "FALSE"),
    ("with 1", "{{with 1}}{{.}}{{else}}ZERO{{end}}", T, "1"),
    ("with emptystring", "{{with ``}}{{.}}{{else}}EMPTY{{end}}", T, "EMPTY"),
    ("with $x int", "{{with $x := .I}}{{$x}}{{end}}", T, "17"),
    ("with $x struct.U.V", "{{with $x := $}}{{$x.U.V}}{{end}}", T, "v"),
    ("with variable and action", "{{with $x := $}}{{$y := $.U.V}}{{$y}}{{end}}", T, "v"),
    ("with else with", "{{with 0}}{{.}}{{else with true}}{{.}}{{end}}", T, "true"),
    ("with else with chain", "{{with 0}}{{.}}{{else with false}}{{.}}{{else with `notempty`}}"
     "{{.}}{{end}}", T, "notempty"),
    ("field on nil interface", "{{.Empty0.V}}", T, None),
    ("field on a string", "{{.S.V}}", T, None),
    ("function on a field", "{{.I 1}}", T, None),
    ("break outside range", "{{range .SI}}{{end}}{{break}}", T, None),
    ("template not defined", '{{template "nope"}}', T, None),
    ("too deep recursion", '{{define "r"}}{{template "r" .}}{{end}}{{template "r" .}}', T,
     None),
    ("wrong number of args", "{{len 1 2}}", T, None),
    ("wrong arg type", "{{printf 3}}", T, None),
    ("can't give argument to non-function", "{{1 2}}", T, None),
    ("non-function variable", "{{$x := 1}}{{$x 2}}", T, None),
]

# multi_test.go multiExecTests, with its templates defined inline
MULTI = ('{{define "x"}}TEXT{{end}}{{define "dotV"}}{{.V}}{{end}}{{define "dot"}}{{.}}{{end}}'
         '{{define "nested"}}{{template "dot" .}}{{end}}')
MULTI_CASES = [
    ("empty", "", ""),
    ("text", "some text", "some text"),
    ("invoke x", '{{template "x" .SI}}', "TEXT"),
    ("invoke x no args", '{{template "x"}}', "TEXT"),
    ("invoke dot int", '{{template "dot" .I}}', "17"),
    ("invoke dot []int", '{{template "dot" .SI}}', "[3 4 5]"),
    ("invoke dotV", '{{template "dotV" .U}}', "v"),
    ("invoke nested int", '{{template "nested" .I}}', "17"),
    ("variable declared by template", '{{template "nested" $x:=.SI}},{{index $x 1}}',
     "[3 4 5],4"),
]

# cmpTests from exec_test.go
CMP_CASES: list[tuple[str, str | None]] = [
    ("eq true true", "true"), ("eq true false", "false"), ("eq 1+2i 1+2i", "true"),
    ("eq 1+2i 1+3i", "false"), ("eq 1.5 1.5", "true"), ("eq 1.5 2.5", "false"),
    ("eq 1 1", "true"), ("eq 1 2", "false"), ('eq "xy" "xy"', "true"),
    ('eq "xy" "xyz"', "false"), ("eq .Uthree .Uthree", "true"), ("eq .Uthree .Ufour", "false"),
    ("eq 3 4 5 6 3", "true"), ("eq 3 4 5 6 7", "false"), ("ne true true", "false"),
    ("ne true false", "true"), ("ne 1.5 1.5", "false"), ("ne 1 2", "true"),
    ('ne "xy" "xy"', "false"), ("lt 1.5 1.5", "false"), ("lt 1.5 2.5", "true"),
    ("lt 1 1", "false"), ("lt 1 2", "true"), ('lt "xy" "xy"', "false"),
    ('lt "xy" "xyz"', "true"), ("le 1.5 1.5", "true"), ("le 1.5 2.5", "true"),
    ("le 2.5 1.5", "false"), ("le 1 1", "true"), ("le 1 2", "true"), ("le 2 1", "false"),
    ('le "xy" "xy"', "true"), ('le "xyz" "xy"', "false"), ("gt 1.5 1.5", "false"),
    ("gt 2.5 1.5", "true"), ("gt 1 2", "false"), ("gt 2 1", "true"), ('gt "xyz" "xy"', "true"),
    ("ge 1.5 1.5", "true"), ("ge 1.5 2.5", "false"), ("ge 2 1", "true"),
    ('ge "xy" "xyz"', "false"),
    ("eq .Uthree .Three", "true"), ("eq .Three .Uthree", "true"), ("le .Uthree .Three", "true"),
    ("eq .NonNilMap nil", "false"),
    ("eq `xy` 1", None), ("eq 2 2.0", None), ("lt true true", None), ("lt 1+0i 1+0i", None),
    ("eq .Empty0 .Empty0", "true"),
]
CMP_DATA = {"Uthree": gotemplate.values.Uint64(3), "Ufour": gotemplate.values.Uint64(4),
            "Three": 3, "Empty0": None, "NonNilMap": {}}

# parse_test.go errorTests (the message must contain the given text)
PARSE_ERRORS = [
    ("unclosed1", "line1\n{{", "unclosed1:2: unclosed action"),
    ("unclosed2", "line1\n{{define `x`}}line2\n{{", "unclosed2:3: unclosed action"),
    ("var1", "line1\n{{\nx\n}}", 'var1:3: function "x" not defined'),
    ("function", "{{foo}}", 'function "foo" not defined'),
    ("comment1", "{{/*}}", "comment1:1: unclosed comment"),
    ("comment2", "{{/*\nhello\n}}", "comment2:1: unclosed comment"),
    ("lparen", "{{.X (1 2 3}}", "unclosed left paren"),
    ("rparen", "{{.X 1 2 3 ) }}", "unexpected right paren"),
    ("rparen2", "{{(.X 1 2 3", "unclosed action"),
    ("space", "{{`x`3}}", "in operand"),
    ("idchar", "{{a#}}", "'#'"),
    ("charconst", "{{'a}}", "unterminated character constant"),
    ("stringconst", '{{"a}}', "unterminated quoted string"),
    ("rawstringconst", "{{`a}}", "unterminated raw quoted string"),
    ("number", "{{0xi}}", "number syntax"),
    ("multidefine", "{{define `a`}}a{{end}}{{define `a`}}b{{end}}",
     "multiple definition of template"),
    ("eof", "{{range .X}}", "unexpected EOF"),
    ("variable", "{{$x := 23}}{{with $x.y := 3}}{{$x 23}}{{end}}", 'unexpected ":="'),
    ("multidecl", "{{$a,$b,$c := 23}}", "too many declarations"),
    ("undefvar", "{{$a}}", "undefined variable"),
    ("wrongdot", "{{true.any}}", "unexpected . after term"),
    ("wrongpipeline", "{{12|false}}", "non executable command in pipeline"),
    ("emptypipeline", "{{ ( ) }}", "missing value for parenthesized pipeline"),
    ("multilinerawstring", "{{ $v := `\n` }} {{", "multilinerawstring:2: unclosed action"),
    ("rangeundefvar", "{{range $k}}{{end}}", "undefined variable"),
    ("rangeundefvars", "{{range $k, $v}}{{end}}", "undefined variable"),
    ("rangemissingvalue1", "{{range $k,}}{{end}}", "missing value for range"),
    ("rangemissingvalue2", "{{range $k, $v := }}{{end}}", "missing value for range"),
    ("rangenotvariable1", "{{range $k, .}}{{end}}", "range can only initialize variables"),
    ("rangenotvariable2", "{{range $k, 123 := .}}{{end}}",
     "range can only initialize variables"),
    # and a few more from parse_test.go's parseTests marked hasError
    ("unmatched end", "{{end}}", "unexpected {{end}}"),
    ("unmatched else", "{{else}}", "unexpected {{else}}"),
    ("empty action", "{{}}", "missing value for command"),
    ("break outside range", "{{break}}", "{{break}} outside {{range}}"),
    ("continue outside range", "{{continue}}", "{{continue}} outside {{range}}"),
    ("break in range in define", "{{range .}}{{define `x`}}{{break}}{{end}}{{end}}",
     "unexpected"),
    ("template name not a string", "{{template .X}}", "unexpected"),
]


def run(text: str, data: Any = NO_VALUE, *, missing_key: str = "default") -> str:
    tmpl = gotemplate.parse(text, name="test", missing_key=missing_key)
    return tmpl.execute(lambda p, kv: None, max_output=1 << 16, dot=data, env={})


@pytest.mark.parametrize(("name", "text", "data", "want"), EXEC_CASES,
                         ids=[c[0] for c in EXEC_CASES])
def test_exec(name: str, text: str, data: Any, want: str | None) -> None:
    if want is None:
        with pytest.raises(gotemplate.GoTemplateError):
            run(text, data)
    else:
        assert run(text, data) == want


@pytest.mark.parametrize(("name", "text", "want"), MULTI_CASES, ids=[c[0] for c in MULTI_CASES])
def test_multi(name: str, text: str, want: str) -> None:
    assert run(MULTI + text, T) == want


@pytest.mark.parametrize(("expr", "want"), CMP_CASES, ids=[c[0] for c in CMP_CASES])
def test_comparisons(expr: str, want: str | None) -> None:
    if want is None:
        with pytest.raises(gotemplate.GoTemplateError):
            run("{{" + expr + "}}", CMP_DATA)
    else:
        assert run("{{" + expr + "}}", CMP_DATA) == want


@pytest.mark.parametrize(("name", "text", "message"), PARSE_ERRORS,
                         ids=[c[0] for c in PARSE_ERRORS])
def test_parse_errors(name: str, text: str, message: str) -> None:
    with pytest.raises(gotemplate.GoTemplateError) as info:
        gotemplate.parse(text, name=name)
    assert message in str(info.value)
    assert isinstance(info.value, RenderError)


# --- exact messages Go gives at execution (exec_test.go TestExecuteError & friends) -------


def test_missing_key_modes() -> None:
    # exec_test.go TestMissingMapKey: default and zero print <no value>; error fails.
    data = {"x": 99}
    assert run("{{.x}} {{.y}}", data) == "99 <no value>"
    assert run("{{.x}} {{.y}}", data, missing_key="zero") == "99 <no value>"
    with pytest.raises(gotemplate.GoTemplateError, match='map has no entry for key "y"'):
        run("{{.x}} {{.y}}", data, missing_key="error")
    # consul-template's zero mode: a field of a missing key is a nil interface: Go errors
    with pytest.raises(gotemplate.GoTemplateError, match=r"nil pointer evaluating interface"):
        run("{{.y.z}}", data, missing_key="zero")
    assert run("{{.y.z}}", data) == "<no value>"


def test_error_names_template_and_line_not_data() -> None:
    secret = "s3cr3t-value"
    with pytest.raises(gotemplate.GoTemplateError) as info:
        run("ok\n{{ printf \"%s\" .pw }}\n{{ len .pw.deeper }}", {"pw": secret})
    text = str(info.value)
    assert text.startswith("test:3: executing at <.pw.deeper>: ")
    assert (info.value.template, info.value.line) == ("test", 3)
    assert secret not in text


def test_define_may_reuse_the_file_name() -> None:
    # consul-template's main template is named "": a define named like the file is fine
    assert run('{{ define "test" }}in{{ end }}{{ template "test" }}') == "in"
    with pytest.raises(gotemplate.GoTemplateError, match=r'test:1: executing at <.x> in "t": '):
        run('{{ define "t" }}{{ .x }}{{ end }}{{ template "t" 1 }}')


def test_range_error_does_not_print_the_value() -> None:
    with pytest.raises(gotemplate.GoTemplateError) as info:
        run("{{ range .pw }}{{ end }}", {"pw": "s3cr3t"})
    assert "s3cr3t" not in str(info.value)
    assert "string" in str(info.value)


# --- Go's fmt (cases from src/fmt/fmt_test.go fmtTests) -----------------------------------

FMT_CASES = [
    ("%d", 12345, "12345"), ("%v", 12345, "12345"), ("%t", True, "true"),
    ("%s", "abc", "abc"), ("%q", "abc", '"abc"'), ("%x", "abc", "616263"),
    ("%x", "\xff\xf0\x0f\xff", "c3bfc3b00fc3bf"), ("%X", "xyz", "78797A"),
    ("% x", "xyz", "78 79 7a"), ("%#x", "xyz", "0x78797a"), ("%# x", "xyz", "0x78 0x79 0x7a"),
    ("%5s", "abc", "  abc"), ("%-5s", "abc", "abc  "), ("%05s", "abc", "00abc"),
    ("%.5s", "abcdefghijklmnopqrstuvwxyz", "abcde"), ("%.0s", "日本語日本語", ""),
    ("%.5s", "日本語日本語", "日本語日本"), ("%q", "日本語", '"日本語"'),
    ("%+q", "日本語", '"\\u65e5\\u672c\\u8a9e"'), ("%#q", "`", '"`"'),
    ("%q", "\x00", '"\\x00"'), ("%c", "x", "%!c(string=x)"), ("%d", "x", "%!d(string=x)"),
    ("%q", 0x263a, "'☺'"), ("%c", 0x263a, "☺"), ("%U", 0x263a, "U+263A"),
    ("%#U", 0x263a, "U+263A '☺'"), ("%5d", 12345, "12345"), ("%-5d", -1, "-1   "),
    ("%+d", 12345, "+12345"), ("% d", 12345, " 12345"), ("%05d", -12, "-0012"),
    ("%.3d", 7, "007"), ("%6.3d", 7, "   007"), ("%o", 8, "10"), ("%#o", 8, "010"),
    ("%O", 8, "0o10"), ("%b", 5, "101"), ("%x", -255, "-ff"), ("%#X", 255, "0XFF"),
    ("%e", 1.0, "1.000000e+00"), ("%e", 1234.5678e3, "1.234568e+06"),
    ("%e", 1234.5678e-8, "1.234568e-05"), ("%f", 1e-5, "0.000010"), ("%.2f", 1.0, "1.00"),
    ("%8.3f", -1.0, "  -1.000"), ("%+.3e", 0.0, "+0.000e+00"), ("%g", 1e6, "1e+06"),
    ("%g", 100000.0, "100000"), ("%g", 1.0, "1"), ("%g", 1e-5, "1e-05"), ("%v", 1e21, "1e+21"),
    ("%v", 1e20, "1e+20"), ("%v", 123456789.0, "1.23456789e+08"), ("%.3g", 12345.0, "1.23e+04"),
    ("%G", 1e-10, "1E-10"), ("%v", float("inf"), "+Inf"), ("%v", float("-inf"), "-Inf"),
    ("%v", float("nan"), "NaN"), ("%f", float("inf"), "+Inf"), ("%8.2f", float("nan"), "     NaN"),
    ("%v", [1, 2, 3], "[1 2 3]"), ("%d", [1, 2, 3], "[1 2 3]"), ("%q", ["a", "b"], '["a" "b"]'),
    ("%v", {"b": 2, "a": 1}, "map[a:1 b:2]"), ("%v", None, "<nil>"), ("%d", None, "%!d(<nil>)"),
    ("%v", JsonNumber("1.50"), "1.50"), ("%d", JsonNumber("7"), "%!d(json.Number=7)"),
    ("%T", JsonNumber("7"), "json.Number"), ("%d", Int64(5), "5"),
    ("%s", Int64(5), "%!s(int64=5)"), ("%x", 1.0, "0x1p+00"), ("%b", 1.0, "4503599627370496p-52"),
    ("%5t", True, " true"), ("%!", 1, "%!!(int=1)"), ("%z", 1, "%!z(int=1)"),
]


@pytest.mark.parametrize(("fmt", "arg", "want"), FMT_CASES,
                         ids=[f"{c[0]}-{c[1]!r}" for c in FMT_CASES])
def test_fmt(fmt: str, arg: Any, want: str) -> None:
    from agentd.gotemplate.gofmt import sprintf

    assert sprintf(fmt, [arg]) == want


def test_fmt_missing_and_extra() -> None:
    from agentd.gotemplate.gofmt import sprintf

    assert sprintf("%d %d", [1]) == "1 %!d(MISSING)"
    assert sprintf("%d", [1, "x", None]) == "1%!(EXTRA string=x, <nil>)"
    assert sprintf("%", []) == "%!(NOVERB)"
    assert sprintf("%[2]d %[1]d", [1, 2]) == "2 1"
    assert sprintf("%[3]d", [1]) == "%!d(BADINDEX)"
    assert sprintf("%*d|%-*d|%.*f", [5, 42, 4, 7, 2, 3.14159]) == "   42|7   |3.14"


# --- consul-template functions (their semantics from template/funcs.go) ------------------


def test_consul_template_math_argument_order() -> None:
    # funcs.go: subtract(b, a) returns a - b, divide(b, a) returns a / b
    assert run("{{ subtract 1 5 }} {{ 5 | subtract 1 }} {{ divide 2 10 }} {{ modulo 3 10 }}") \
        == "4 4 5 1"
    assert run("{{ add 9223372036854775807 1 }}") == "-9223372036854775808"  # int64 wraps
    with pytest.raises(gotemplate.GoTemplateError, match="integer divide by zero"):
        run("{{ divide 0 1 }}")


def test_secret_paths_and_kv_args() -> None:
    text = ('{{ with secret "secret/data/a" }}{{ end }}\n'
            '{{ with secret "pki/issue/web" "common_name=web.internal" "ttl=24h" }}{{ end }}\n'
            '{{ range secrets "kv/list/" }}{{ end }}{{ with pkiCert "pki/issue/x" }}{{ end }}')
    tmpl = gotemplate.parse(text, name="t.tmpl")
    refs = tmpl.secret_paths()
    assert [(r.function, r.path, r.line) for r in refs] == [
        ("secret", "secret/data/a", 1), ("secret", "pki/issue/web", 2),
        ("secrets", "kv/list/", 3), ("pkiCert", "pki/issue/x", 3)]
    assert refs[1].args == ("common_name=web.internal", "ttl=24h")
    seen = []

    def lookup(path: str, kv: Any) -> Any:
        seen.append((path, dict(kv)))
        return None

    tmpl.execute(lookup, max_output=100, env={})
    assert ("pki/issue/web", {"common_name": "web.internal", "ttl": "24h"}) in seen


def test_secret_path_must_be_literal() -> None:
    with pytest.raises(gotemplate.GoTemplateError, match=r"t.tmpl:2: secret: the path must be"):
        gotemplate.parse('x\n{{ secret (printf "a/%s" "b") }}', name="t.tmpl")


@pytest.mark.parametrize("fn", ["plugin", "writeToFile", "file", "key", "sockaddr"])
def test_unsupported_functions_fail_at_parse(fn: str) -> None:
    with pytest.raises(gotemplate.GoTemplateError) as info:
        gotemplate.parse(f'a\nb\n{{{{ {fn} "x" }}}}', name="template.tmpl")
    assert str(info.value) == f'template.tmpl:3: function "{fn}" not supported'


def test_function_not_allowed_by_config() -> None:
    with pytest.raises(gotemplate.GoTemplateError, match='function "toJSON" not supported'):
        gotemplate.parse("{{ toJSON 1 }}", name="t", funcs={"secret"})
    assert gotemplate.parse("{{ len `x` }}", name="t", funcs=set()).execute(
        lambda p, kv: None, max_output=10) == "1"


def test_env_only_allowed_names() -> None:
    with pytest.raises(gotemplate.GoTemplateError, match='environment variable "HOME"'):
        gotemplate.parse('{{ env "HOME" }}', name="t")
    tmpl = gotemplate.parse('{{ env "A" }}|{{ env (print "B") }}', name="t", env_allow={"A"})
    with pytest.raises(gotemplate.GoTemplateError, match="not allowed"):
        tmpl.execute(lambda p, kv: None, max_output=100, env={"A": "1", "B": "2"})
    ok = gotemplate.parse('{{ env "A" }}', name="t", env_allow={"A"})
    assert ok.execute(lambda p, kv: None, max_output=100, env={"A": "1", "B": "2"}) == "1"


def test_to_json_like_go() -> None:
    data = gotemplate.decode_json('{"b": [1, 2.50, null], "a": "<&>\\u2028", "c": {}}')
    out = run("{{ toJSON . }}|{{ toJSONPretty . }}", data)
    assert out == ('{"a":"\\u003c\\u0026\\u003e\\u2028","b":[1,2.50,null],"c":{}}|{\n'
                   '  "a": "\\u003c\\u0026\\u003e\\u2028",\n  "b": [\n    1,\n    2.50,\n'
                   '    null\n  ],\n  "c": {}\n}')


def test_timestamp_layouts() -> None:
    from datetime import datetime, timezone

    now = datetime(2024, 3, 5, 7, 8, 9, 123000, tzinfo=timezone.utc)
    tmpl = gotemplate.parse('{{ timestamp }}|{{ timestamp "unix" }}|'
                            '{{ timestamp "Jan _2 2006 15:04:05.000 MST" }}', name="t")
    assert tmpl.execute(lambda p, kv: None, max_output=200, now=now) == (
        "2024-03-05T07:08:09Z|1709622489|Mar  5 2024 07:08:09.123 UTC")


# --- bounds ------------------------------------------------------------------------------


def test_output_cap() -> None:
    tmpl = gotemplate.parse("{{ range 1000 }}xxxxxxxxxx{{ end }}", name="t")
    with pytest.raises(gotemplate.GoTemplateError, match="output exceeds the limit"):
        tmpl.execute(lambda p, kv: None, max_output=5000)


def test_step_budget() -> None:
    tmpl = gotemplate.parse("{{ range 100000000 }}{{ end }}", name="t")
    with pytest.raises(gotemplate.GoTemplateError, match="step budget"):
        tmpl.execute(lambda p, kv: None, max_output=5000, max_steps=10_000)
    nested = gotemplate.parse("{{ range 1000 }}{{ range 1000 }}{{ end }}{{ end }}", name="t")
    with pytest.raises(gotemplate.GoTemplateError, match="step budget"):
        nested.execute(lambda p, kv: None, max_output=5000, max_steps=10_000)


def test_value_growth_is_capped() -> None:
    text = '{{ $s := "aaaaaaaaaa" }}{{ range 30 }}{{ $s = replaceAll "a" "aa" $s }}{{ end }}'
    with pytest.raises(gotemplate.GoTemplateError, match="exceeds the output limit"):
        gotemplate.parse(text, name="t").execute(lambda p, kv: None, max_output=100_000)


def test_recursion_is_an_error() -> None:
    text = '{{ define "r" }}{{ executeTemplate "r" }}{{ end }}{{ template "r" }}'
    with pytest.raises(gotemplate.GoTemplateError):
        gotemplate.parse(text, name="t").execute(lambda p, kv: None, max_output=100)
    with pytest.raises(gotemplate.GoTemplateError, match="depth"):
        gotemplate.parse("{{" + "(" * 500 + "1" + ")" * 500 + "}}", name="t")
    with pytest.raises(gotemplate.GoTemplateError, match="depth"):
        gotemplate.parse("{{ if 1 }}" * 500 + "{{ end }}" * 500, name="t")


def test_importable_by_the_sandboxed_worker() -> None:
    """The engine imports the standard library and agentd.errors, nothing else of agentd's."""
    import subprocess
    import sys

    code = ("import sys, agentd.gotemplate; "
            "print(' '.join(sorted(m for m in sys.modules if m.startswith('agentd') or "
            "m.split('.')[0] in ('trio', 'jinja2', 'cryptography', 'h11', 'msgpack'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=30).stdout.split()
    assert set(out) <= {"agentd", "agentd.errors"} | {
        f"agentd.gotemplate{m}" for m in ("", ".exec", ".funcs", ".gofmt", ".parse",
                                          ".values", ".sprig")}


def test_unknown_sprig_functions_are_not_supported() -> None:
    with pytest.raises(gotemplate.GoTemplateError, match='t:1: function "sprig_env" not sup'):
        gotemplate.parse('{{ sprig_env "HOME" }}', name="t")
    assert run('{{ "a" | sprig_upper }}') == "A"


@pytest.mark.parametrize("text", [
    '{{ replaceAll "0" (printf "%999999d" 0) (printf "%09999d" 0) }}',
    '{{ $l := split "," (printf "%09999d" 0 | replaceAll "0" "x,") }}'
    '{{ join (printf "%999999d" 0) $l }}',
    '{{ indent 99999999 (printf "%09999d" 0 | replaceAll "0" "\\n") }}',
    '{{ sprig_repeat 999999999 "abc" }}',
])
def test_no_function_builds_a_huge_string(text: str) -> None:
    with pytest.raises(gotemplate.GoTemplateError, match="would exceed"):
        gotemplate.parse(text, name="t").execute(lambda p, kv: None, max_output=1 << 30)


def test_missing_secret_is_nil() -> None:
    # consul-template returns nil for a dependency it does not have (yet)
    tmpl = gotemplate.parse('{{ with secret "a/b" }}x{{ else }}none{{ end }} {{ secret "a/b" }}'
                            ' {{ secrets "a/" }} {{ len (secrets "a/") }}', name="t")
    assert tmpl.execute(lambda p, kv: None, max_output=100) == "none <no value> [] 0"


def test_plain_python_numbers_print_as_their_text() -> None:
    tmpl = gotemplate.parse('{{ with secret "kv/x" }}{{ .Data.n }} {{ .Data.f }} '
                            '{{ printf "%d" .Data.n }} {{ toJSON .Data }}{{ end }}', name="t")
    out = tmpl.execute(lambda p, kv: {"data": {"n": 5, "f": 2.5}}, max_output=200)
    assert out == '5 2.5 %!d(json.Number=5) {"f":2.5,"n":5}'


@pytest.mark.parametrize("reply", [["a"], "text", 3, {"data": "not a map"}, {"data": None},
                                   {"data": {"keys": "x"}}, {"lease_duration": "x"}])
def test_odd_lookup_replies_are_template_errors_or_values(reply: Any) -> None:
    tmpl = gotemplate.parse('{{ with secret "a" }}{{ .Data }}{{ end }}{{ secrets "b/" }}'
                            '{{ with pkiCert "c/issue/x" }}{{ .Cert }}{{ end }}', name="t")
    with contextlib.suppress(gotemplate.GoTemplateError):
        tmpl.execute(lambda p, kv: reply, max_output=1000)
