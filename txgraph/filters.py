"""
containerd's filter language (its C{filters} package, v1.6), which
containerd sends in a snapshotter's List: C{parse_all(filters)} returns a
predicate over a field-path lookup.

The grammar, as containerd's parser.go states it::

    selectors := selector ("," selector)*
    selector  := fieldpath (operator value)
    fieldpath := field ('.' field)*
    field     := quoted | [A-Za-z] [A-Za-z0-9_]+
    operator  := "==" | "!=" | "~="
    value     := quoted | [^\\s,]+
    quoted    := <go string syntax>

A comma is "and"; several filters are "or"; no filter (or an empty one)
matches everything; a selector without operator tests that the field is
present.  C{!=} matches an absent field too, as containerd's does.  The
scanner is containerd's: fields are runs of letters, digits, C{_} and
C{-}; C{"}, C{/} and C{|} open quoted strings; a value runs to the next
comma or space.  A filter that does not parse is a L{BadRequest} naming it
(containerd answers InvalidArgument).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from txgraph.errors import BadRequest

#: Looks a field path up in an object: (value, present).
Adaptor = Callable[[Sequence[str]], tuple[str, bool]]

#: A parsed filter.
Filter = Callable[[Adaptor], bool]

_ESCAPES = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v", "\\": "\\"}


class FilterError(BadRequest):
    """
    A filter that does not parse.
    """


@dataclass(frozen=True)
class _Token:
    kind: str  # "field", "value", "quoted", "sep", "op", "eof", "illegal"
    text: str
    pos: int


def _field_rune(ch: str) -> bool:
    return ch in "-_" or ("a" <= ch <= "z") or ("A" <= ch <= "Z") or ("0" <= ch <= "9")


def _value_rune(ch: str) -> bool:
    if ch == "," or ch.isspace():
        return False
    category = unicodedata.category(ch)
    # Go's IsLetter, IsDigit, IsNumber, IsGraphic, IsPunct: every visible rune.
    return category[0] in "LNPSM" or category == "Zs"


class _Scanner:
    """
    containerd's filters scanner (scanner.go).
    """

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0
        self.value = False

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def scan(self) -> _Token:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1
        start = self.pos
        if start >= len(self.text):
            return _Token("eof", "", start)
        ch = self.text[start]
        self.pos += 1
        if ch in '"/|':
            return self._quoted(ch, start)
        if ch in ",.":
            self.value = False
            return _Token("sep", ch, start)
        if ch in "=!~":
            while self.peek() and self.peek() in "=!~":
                self.pos += 1
            self.value = True
            return _Token("op", self.text[start : self.pos], start)
        if self.value:
            while self.peek() and _value_rune(self.peek()):
                self.pos += 1
            self.value = False
            return _Token("value", self.text[start : self.pos], start)
        if _field_rune(ch):
            while self.peek() and _field_rune(self.peek()):
                self.pos += 1
            return _Token("field", self.text[start : self.pos], start)
        return _Token("illegal", ch, start)

    def _quoted(self, quote: str, start: int) -> _Token:
        while self.pos < len(self.text):
            ch = self.text[self.pos]
            self.pos += 1
            if ch == "\n":
                break
            if ch == "\\":
                self.pos += 1
                continue
            if ch == quote:
                return _Token("quoted", self.text[start : self.pos], start)
        return _Token("illegal", self.text[start : self.pos], start)


def _unquote(text: str) -> str:
    """
    A quoted string's value: Go's string syntax between double quotes;
    between C{/} or C{|} (regular expressions), the text as it is but for
    escaped delimiters.
    """
    quote, body = text[0], text[1:-1]
    if quote != '"':
        return body.replace("\\" + quote, quote)
    out = []
    i = 0
    while i < len(body):
        ch = body[i]
        if ch != "\\":
            out.append(ch)
            i += 1
            continue
        esc = body[i + 1] if i + 1 < len(body) else ""
        if esc in _ESCAPES or esc == '"':
            out.append(_ESCAPES.get(esc, esc))
            i += 2
        elif esc in "01234567" and esc:
            out.append(chr(int(body[i + 1 : i + 4], 8)))
            i += 4
        elif esc in ("x", "u", "U"):
            width = {"x": 2, "u": 4, "U": 8}[esc]
            digits = body[i + 2 : i + 2 + width]
            if len(digits) != width or not re.fullmatch(r"[0-9a-fA-F]+", digits):
                raise ValueError(f"invalid \\{esc} escape")
            out.append(chr(int(digits, 16)))
            i += 2 + width
        else:
            raise ValueError(f"invalid escape \\{esc}")
    return "".join(out)


class _Parser:
    """
    containerd's filters parser (parser.go).
    """

    def __init__(self, text: str) -> None:
        self.text = text
        self.scanner = _Scanner(text)
        self.ahead: _Token | None = None

    def peek(self) -> _Token:
        if self.ahead is None:
            self.ahead = self.scanner.scan()
        return self.ahead

    def next(self) -> _Token:
        token = self.peek()
        self.ahead = None
        return token

    def error(self, token: _Token, why: str) -> FilterError:
        return FilterError(
            f"invalid filter {self.text!r}: {why} at position {token.pos}"
            + (f" ({token.text!r})" if token.text else "")
        )

    def selectors(self) -> Filter:
        parts = [self.selector()]
        while True:
            token = self.peek()
            if token.kind == "eof":
                break
            if token.kind == "sep" and token.text == ",":
                self.next()
                parts.append(self.selector())
                continue
            raise self.error(token, "unexpected input")
        return lambda adaptor: all(part(adaptor) for part in parts)

    def selector(self) -> Filter:
        path = self.fieldpath()
        token = self.peek()
        if token.kind == "eof" or (token.kind == "sep" and token.text == ","):
            return lambda adaptor: adaptor(path)[1]
        op = self.next()
        if op.kind != "op" or op.text not in ("==", "!=", "~="):
            raise self.error(op, 'expected an operator ("=="|"!="|"~=")')
        value = self.value()
        if op.text == "==":
            return lambda adaptor: adaptor(path) == (value, True)
        if op.text == "!=":
            return lambda adaptor: adaptor(path)[0] != value
        try:
            pattern = re.compile(value)
        except re.error as e:
            raise self.error(op, f"invalid regular expression {value!r}: {e}") from None
        return lambda adaptor: pattern.search(adaptor(path)[0]) is not None

    def fieldpath(self) -> list[str]:
        path = [self.field()]
        while self.peek().kind == "sep" and self.peek().text == ".":
            self.next()
            path.append(self.field())
        return path

    def field(self) -> str:
        token = self.next()
        if token.kind == "field":
            return token.text
        if token.kind == "quoted":
            return self.unquote(token)
        raise self.error(token, "expected field or quoted")

    def value(self) -> str:
        token = self.next()
        if token.kind in ("value", "field"):
            return token.text
        if token.kind == "quoted":
            return self.unquote(token)
        raise self.error(token, "expected value or quoted")

    def unquote(self, token: _Token) -> str:
        try:
            return _unquote(token.text)
        except ValueError as e:
            raise self.error(token, f"unquoting failed: {e}") from None


def parse(text: str) -> Filter:
    """
    One filter (selectors joined by commas: all must match).
    """
    if text == "":
        return lambda adaptor: True
    return _Parser(text).selectors()


def parse_all(texts: Sequence[str]) -> Filter:
    """
    Several filters: any may match; none matches everything.
    """
    if not texts:
        return lambda adaptor: True
    filters = [parse(text) for text in texts]
    return lambda adaptor: any(f(adaptor) for f in filters)
