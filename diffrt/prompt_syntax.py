"""Weighted-prompt syntax: a prompt string -> (text, weight) fragments, torch-free.

Reads compel's prompt syntax (compel 2.x, `compel.prompt_parser`), the subset that
weights text:

    word+  word++  word-          one word, weight 1.1**n / 0.9**n (compel's bases)
    (several words)1.3            a group with an explicit weight
    (several words)+  (...)--     a group, 1.1**n / 0.9**n
    "quoted words"1.3             as a group (quotes instead of parentheses)
    ((nested)1.5 words)0.8        weights multiply inward: "nested" gets 0.8 * 1.5
    \\(  \\)  \\"                    literal parentheses and quotes

and, converted to that syntax first (`a1111_to_compel`), AUTOMATIC1111's:

    (words:1.3) -> (words)1.3     (words) -> (words)1.1     [words] -> (words)0.909...

Fragments come out as compel's flattening makes them: each word with the product of
the weights around it, neighbours of equal weight joined by one space, ',' and '.'
inside a group separate words (compel's parser splits them there), and compel's
`re.sub(r',(\\S)', r', \\1', prompt)` applied first. Where compel's own parser is
lenient (an unbalanced parenthesis is read as text) diffrt refuses the prompt in one
line naming the position; compel reads parentheses only at the start of a word at the
top level, diffrt anywhere. Operators (`.and()`, `.blend()`, `.swap()`, `.attend()`,
`withLora()`) are not supported: refused in one line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from diffrt.errors import DiffrtError

# compel's PromptParser defaults (attention_plus_base, attention_minus_base).
PLUS_BASE = 1.1
MINUS_BASE = 0.9
# AUTOMATIC1111's weights for (words) and [words].
A1111_UP = 1.1
A1111_DOWN = 1 / 1.1

SYNTAXES = ("compel", "a1111")
_NUMBER = re.compile(r"\d+\.\d*|\.\d+|\d+")  # pyparsing_common.real | int, unsigned (a '-' is a weight run)
_OPERATORS = re.compile(r"\.(and|add|blend|swap|attend)\(|\b(withLora|useLora)\(")
_ESCAPES = {"\\(": "(", "\\)": ")", '\\"': '"'}
_GROUP_SEPARATORS = ",."  # separate fragments inside a group (compel's fragment_including_commas_or_periods)


@dataclass(frozen=True)
class Fragment:
    text: str
    weight: float


def check_syntax(value: Any) -> str | None:
    """The request option `prompt_weighting`: None/False (off), True or "compel", "a1111"."""
    if value is None or value is False:
        return None
    if value is True:
        return "compel"
    if value not in SYNTAXES:
        raise DiffrtError(f"prompt_weighting={value!r}; choose one of: {', '.join(SYNTAXES)} (or true: compel)")
    return str(value)


def parse(prompt: str, syntax: str = "compel") -> tuple[Fragment, ...]:
    """`prompt` in `syntax` ("compel" or "a1111") as fused fragments; an empty prompt is
    one empty fragment of weight 1 (compel's). A DiffrtError names the bad position."""
    if syntax == "a1111":
        prompt = a1111_to_compel(prompt)
    elif syntax != "compel":
        raise DiffrtError(f"prompt_weighting={syntax!r}; choose one of: {', '.join(SYNTAXES)}")
    prompt = re.sub(r",(\S)", r", \1", prompt)
    operator = _OPERATORS.search(prompt)
    if operator:
        raise DiffrtError(f"prompt_weighting: {_quote(prompt)} at character {operator.start()}: the operator "
                          f"{operator.group(0)!r} is not supported; weight words as (words)1.2")
    if not prompt.strip():
        return (Fragment("", 1.0),)
    parser = _Parser(prompt)
    words = parser.items(top=True)
    fused = _fuse([Fragment(text, _weight(factors)) for text, factors in words])
    return fused or (Fragment("", 1.0),)


def _weight(factors: tuple[float, ...]) -> float:
    """The product of the weights around a word, innermost first, multiplied outermost
    first as compel's flatten() does (the same float, so equal weights fuse alike)."""
    scale = 1.0
    for factor in reversed(factors):
        scale = scale * factor
    return 1.0 * scale


def _fuse(fragments: list[Fragment]) -> tuple[Fragment, ...]:
    """compel's fuse_fragments: neighbours of equal weight become one, joined by a space."""
    fused: list[Fragment] = []
    for fragment in fragments:
        if fused and fused[-1].weight == fragment.weight:
            fused[-1] = Fragment(fused[-1].text + " " + fragment.text, fragment.weight)
        else:
            fused.append(fragment)
    return tuple(fused)


def _unescape(text: str) -> str:
    for escaped, plain in _ESCAPES.items():
        text = text.replace(escaped, plain)
    return text


def _quote(prompt: str, limit: int = 60) -> str:
    return repr(prompt if len(prompt) <= limit else prompt[:limit] + "...")


class _Parser:
    """Recursive descent over compel's syntax; `pos` is the next character to read."""

    def __init__(self, text: str):
        self.text = text
        self.pos = 0

    def error(self, position: int, what: str) -> DiffrtError:
        return DiffrtError(f"prompt_weighting: {_quote(self.text)} at character {position}: {what} (escape a literal "
                           "one as \\( \\) \\\")")

    def items(self, top: bool = False, closer: str = "") -> list[tuple[str, tuple[float, ...]]]:
        """Words with the weights around them (innermost first) up to `closer` (not
        consumed) or the end; `top`: whole words carry ',' and '.' (compel's free_word)
        instead of splitting there."""
        out: list[tuple[str, tuple[float, ...]]] = []
        text = self.text
        while self.pos < len(text):
            char = text[self.pos]
            if char.isspace():
                self.pos += 1
            elif char == closer:
                return out
            elif char == ")":
                raise self.error(self.pos, "unbalanced ')'")
            elif char in '("':
                out += self.group(char)
            elif not top and char in _GROUP_SEPARATORS:
                out.append((char, ()))
                self.pos += 1
            else:
                out.append(self.word(top))
        return out

    def group(self, opener: str) -> list[tuple[str, tuple[float, ...]]]:
        start = self.pos
        self.pos += 1
        closer = ")" if opener == "(" else '"'
        children = self.items(closer=closer)  # the group's weight comes after its closer
        if self.pos >= len(self.text):
            raise self.error(start, f"unbalanced {opener!r} (no closing {closer!r})")
        self.pos += 1  # the closer
        weight = self.weight_suffix()
        return [(text, (*factors, weight)) for text, factors in children if text]

    def weight_suffix(self) -> float:
        """A weight written right after a group or word: '+'s, '-'s or a number; 1 if none."""
        text = self.text
        for sign, base in (("+", PLUS_BASE), ("-", MINUS_BASE)):
            end = self.pos
            while end < len(text) and text[end] == sign:
                end += 1
            if end > self.pos:
                count, self.pos = end - self.pos, end
                return pow(base, count)
        match = _NUMBER.match(text, self.pos)
        if match:
            self.pos = match.end()
            return float(match.group(0))
        return 1.0

    def word(self, top: bool) -> tuple[str, tuple[float, ...]]:
        """A run of characters up to whitespace or syntax; a trailing run of '+' or '-'
        (followed by whitespace, syntax or the end) is its weight, as compel's
        `word+` / `word-`. A '+'/'-' inside a word (well-known) is text."""
        text = self.text
        stops = '()"' if top else '()",.'
        start = self.pos
        end = start
        if _sign_ends_word(text, start):  # a bare '+' / '--' run is text, as compel's free_word reads it
            while end < len(text) and not text[end].isspace() and text[end] not in stops:
                end += 1
            self.pos = end
            return _unescape(text[start:end]), ()
        while end < len(text):
            char = text[end]
            if char == "\\" and text[end:end + 2] in _ESCAPES:
                end += 2
                continue
            if char.isspace() or char in stops:
                break
            if end > start and _sign_ends_word(text, end):
                break  # compel: a sign followed by whitespace, syntax or the end is no longer the word's
            end += 1
        weighted = end < len(text) and text[end] in "+-"
        if weighted and top and any(c in ",.=" for c in re.sub(r"\\.", "", text[start:end])):
            # compel weights only a word free of syntax ("dusk.+" is text): take the signs as text
            while end < len(text) and not text[end].isspace() and text[end] not in stops:
                end += 1
            weighted = False
        self.pos = end
        return _unescape(text[start:end]), (self.weight_suffix(),) if weighted else ()


def _sign_ends_word(text: str, i: int) -> bool:
    """Whether text[i] is a '+'/'-' that compel does not read as part of a word: one
    followed by whitespace, a syntax character or the end."""
    return text[i] in "+-" and (i + 1 == len(text) or text[i + 1].isspace() or text[i + 1] in '()",.+-=')


# -- AUTOMATIC1111's syntax, as compel's -----------------------------------------------

_A1111_WEIGHT = re.compile(r":\s*([+-]?[.\d]+)\s*$")
_LOOKS_NUMERIC = re.compile(r":\s*([+-]?[.\d][^\s:]*)\s*$")


def a1111_to_compel(prompt: str) -> str:
    """AUTOMATIC1111's emphasis as compel syntax: (words:w) -> (words)w, (words) ->
    (words)1.1, [words] -> (words)0.9090909090909091 (1/1.1), nesting multiplies in both;
    \\( \\) stay escaped, \\[ \\] become plain brackets. A weight that is not a number
    ((words:1.2.3), (words:)), an unbalanced bracket, or [from:to:when] prompt editing
    is refused in one line naming the position."""
    out: list[str] = []
    stack: list[tuple[str, int, int]] = []  # (opener, its position in the prompt, its index in out)
    i = 0
    while i < len(prompt):
        char = prompt[i]
        pair = prompt[i:i + 2]
        if pair in ("\\(", "\\)"):
            out.append(pair)
            i += 2
            continue
        if pair in ("\\[", "\\]"):
            out.append(pair[1])
            i += 2
            continue
        if char in "([":
            stack.append((char, i, len(out)))
            out.append("(")
        elif char in ")]":
            opener = "(" if char == ")" else "["
            if not stack or stack[-1][0] != opener:
                raise _a1111_error(prompt, i, f"unbalanced {char!r}")
            _, where, index = stack.pop()
            inner = "".join(out[index + 1:])
            del out[index + 1:]
            out.append(_a1111_group(prompt, where, opener, inner))
            out[index] = ""
            if prompt[i + 1:i + 2] in tuple("0123456789.+-"):  # not to be read as the weight's continuation
                out.append(" ")
        else:
            out.append(char)
        i += 1
    if stack:
        opener, where, _ = stack[-1]
        raise _a1111_error(prompt, where, f"unbalanced {opener!r}")
    return "".join(out)


def _a1111_group(prompt: str, where: int, opener: str, inner: str) -> str:
    """One bracketed group, its inside already converted, as compel's `(inner)weight`."""
    if opener == "[":
        if ":" in inner:
            raise _a1111_error(prompt, where, "prompt editing [from:to:when] is not supported")
        return f"({inner}){A1111_DOWN!r}"
    weight = A1111_UP
    numeric = _LOOKS_NUMERIC.search(inner)
    if numeric or inner.rstrip().endswith(":"):
        match = _A1111_WEIGHT.search(inner)
        try:
            weight = float(match.group(1)) if match else float("nan")
        except ValueError:
            weight = float("nan")
        if not weight >= 0:  # NaN (not a number) or negative (compel has no negative weights)
            value = numeric.group(1) if numeric else ""
            raise _a1111_error(prompt, where, f"the group's weight {value!r} is not a number >= 0")
        inner = inner[:match.start()]
    return f"({inner}){weight!r}"


def _a1111_error(prompt: str, position: int, what: str) -> DiffrtError:
    return DiffrtError(f"prompt_weighting (a1111): {_quote(prompt)} at character {position}: {what} (escape a "
                       "literal bracket as \\( \\) \\[ \\])")
