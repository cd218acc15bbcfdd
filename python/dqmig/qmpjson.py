"""QMP's input framing: a byte stream of JSON values, parsed as QEMU's JSON streamer does.

QEMU (qobject/json-lexer.c, json-streamer.c, json-parser.c) needs no newline: the lexer
turns bytes into tokens, the streamer counts braces and brackets and hands the tokens to
the parser whenever both counts are back to zero (or below). So objects may come several
on one line, or pretty-printed over several lines. A lexical error ("stray" byte) resets
the streamer and the lexer skips input until a structural character, a control character
or a 0xFE/0xFF byte. Beyond QEMU: dqmig refuses an input longer than `max_size` bytes
(counted from the end of the previous value) as a whole: one error, and the value it is
part of is dropped to its end, never parsed.

`JsonStream.feed(bytes)` returns, in order, `(value, None)` for each complete value and
`(None, desc)` for each error, with QEMU's wording ("JSON parse error, ...").
"""

from __future__ import annotations

import re
from typing import Any

MAX_TOKEN_COUNT = 2 << 20  # json-streamer.c
MAX_NESTING = 1 << 10

# Token types
LCURLY, RCURLY, LSQUARE, RSQUARE, COLON, COMMA, INTEGER, FLOAT, KEYWORD, STRING = range(10)
_STRUCTURAL = {
    ord("{"): LCURLY,
    ord("}"): RCURLY,
    ord("["): LSQUARE,
    ord("]"): RSQUARE,
    ord(":"): COLON,
    ord(","): COMMA,
}

# Lexer states besides START (between tokens) and RECOVERY (after an error)
START, RECOVERY, DQ, SQ, DQ_ESC, SQ_ESC, NUMBER, WORD = range(8)

_WS = re.compile(rb"[ \t\r\n]*")
# IN_RECOVERY skips everything but control characters (other than tab), 0xFE/0xFF and []{}:,
_SKIP = re.compile(rb"[^\x00-\x08\x0a-\x1f\xfe\xff\[\]{}:,]*")
# Inside a string: any byte 0x20..0xFD but the quote and the backslash
_DQ_RUN = re.compile(rb'[^"\\\x00-\x1f\xfe\xff]*')
_SQ_RUN = re.compile(rb"[^'\\\x00-\x1f\xfe\xff]*")
_WORD_RUN = re.compile(rb"[a-z]*")
_DIGITS = re.compile(rb"[0-9]*")


class JsonStream:
    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self._state = START
        self._num = ""  # NUMBER: the number's lexer sub-state (see _number)
        self._tok = bytearray()  # the token being lexed
        self._tokens: list[tuple[int, bytes]] = []
        self._braces = self._brackets = 0
        self._size = 0  # bytes of the current input since the previous value ended
        self._discarding = False  # inside an over-limit input: drop it to its end
        self._out: list[tuple[Any, str | None]] = []
        self._step_start = 0

    # -- the streamer (json_message_process_token) -------------------------------------------

    def _emit_error(self, desc: str) -> None:
        self._reset()
        self._out.append((None, desc))

    def _reset(self) -> None:
        self._tokens = []
        self._braces = self._brackets = 0
        self._size = 0

    def _token(self, kind: int, text: bytes, end: int) -> None:
        """A token ending at data[end] (the streamer's part); the input so far is then
        self._size plus what this step took."""
        if kind == LCURLY:
            self._braces += 1
        elif kind == RCURLY:
            self._braces -= 1
        elif kind == LSQUARE:
            self._brackets += 1
        elif kind == RSQUARE:
            self._brackets -= 1
        open_ = (self._braces > 0 or self._brackets > 0) and self._braces >= 0 and self._brackets >= 0
        if self._discarding:
            if not open_:  # the over-limit value has ended
                self._discarding = False
                self._reset()
            return
        if self._size + end - self._step_start > self.max_size:
            self._refuse(still_open=open_)
            return
        if len(self._tokens) + 1 > MAX_TOKEN_COUNT:
            self._emit_error("JSON token count limit exceeded")
            return
        if self._braces + self._brackets > MAX_NESTING:
            self._emit_error("JSON nesting depth limit exceeded")
            return
        self._tokens.append((kind, text))
        if open_:
            return
        tokens, self._tokens = self._tokens, []
        self._braces = self._brackets = 0
        self._size = 0
        self._out.append(parse(tokens))

    def _lex_error(self, text: bytes) -> None:
        """A stray byte: the streamer drops what it had, the lexer goes to recovery. Inside
        an over-limit input (already refused) that input ends here: its depth can no longer
        be trusted to find its end, and waiting for it could swallow every later command."""
        self._state = RECOVERY
        self._tok = bytearray()
        if self._discarding:
            self._discarding = False
            self._reset()
            return
        self._emit_error(f"JSON parse error, stray '{text.decode('utf-8', 'replace')}'")

    def _refuse(self, still_open: bool) -> None:
        """The input is over the limit: one error; unless it has just ended, what follows is
        dropped up to the end of the value it is part of (its depth is kept to find that)."""
        depth = (self._braces, self._brackets)
        self._emit_error(f"QMP input longer than {self.max_size} bytes: refused whole")
        if still_open:
            self._braces, self._brackets = depth
            self._discarding = True

    # -- the lexer (json_lexer_feed_char, a run at a time) ------------------------------------

    def feed(self, data: bytes) -> list[tuple[Any, str | None]]:
        self._out = []
        i, n = 0, len(data)
        while i < n:
            self._step_start = i
            i = self._step(data, i)
            self._size += i - self._step_start
        if self._size > self.max_size and not self._discarding:
            self._refuse(still_open=True)
        if self._discarding and self._state in (DQ, SQ, DQ_ESC, SQ_ESC, NUMBER, WORD):
            self._tok = self._tok[:1]  # only the lexical state matters now
        out, self._out = self._out, []
        return out

    def flush(self) -> list[tuple[Any, str | None]]:
        """End of input (json_lexer_flush): a pending token ends; what the streamer holds is
        parsed as it is (e.g. "premature EOI")."""
        self._out = []
        self._step_start = 0
        if self._state in (NUMBER, WORD):
            self._end_word(0)
        elif self._state in (DQ, SQ, DQ_ESC, SQ_ESC):
            self._lex_error(bytes(self._tok))
        self._state = START
        if self._tokens and not self._discarding:
            tokens = self._tokens
            self._reset()
            self._out.append(parse(tokens))
        self._reset()
        self._discarding = False
        out, self._out = self._out, []
        return out

    def _step(self, data: bytes, i: int) -> int:
        """Lexes from data[i] in the current state; returns the index after what it took."""
        state = self._state
        if state == START:
            i = _WS.match(data, i).end()
            if i == len(data):
                return i
            c = data[i]
            kind = _STRUCTURAL.get(c)
            if kind is not None:
                self._token(kind, data[i : i + 1], i + 1)
                return i + 1
            self._tok = bytearray(data[i : i + 1])
            if c == 0x22:
                self._state = DQ
            elif c == 0x27:
                self._state = SQ
            elif 0x61 <= c <= 0x7A:
                self._state = WORD
            elif c == 0x2D:
                self._state, self._num = NUMBER, "sign"
            elif c == 0x30:
                self._state, self._num = NUMBER, "zero"
            elif 0x31 <= c <= 0x39:
                self._state, self._num = NUMBER, "digits"
            else:
                self._lex_error(bytes(self._tok))
            return i + 1
        if state == RECOVERY:
            i = _SKIP.match(data, i).end()
            if i < len(data):
                self._state = START  # lookahead: the byte is lexed afresh
            return i
        if state in (DQ, SQ):
            end = (_DQ_RUN if state == DQ else _SQ_RUN).match(data, i).end()
            if not self._discarding:
                self._tok += data[i:end]
            if end == len(data):
                return end
            c = data[end]
            if c == (0x22 if state == DQ else 0x27):
                self._tok += b'"' if state == DQ else b"'"
                self._state = START
                self._token(STRING, bytes(self._tok), end + 1)
            elif c == 0x5C:
                self._tok.append(c)
                self._state = DQ_ESC if state == DQ else SQ_ESC
            else:
                self._tok.append(c)
                self._lex_error(bytes(self._tok))
            return end + 1
        if state in (DQ_ESC, SQ_ESC):
            c = data[i]
            self._tok.append(c)
            if 0x20 <= c <= 0xFD:
                self._state = DQ if state == DQ_ESC else SQ
            else:
                self._lex_error(bytes(self._tok))
            return i + 1
        if state == WORD:
            end = _WORD_RUN.match(data, i).end()
            self._tok += data[i:end]
            if end < len(data):
                self._end_word(end)
            return end
        return self._number(data, i)

    def _end_word(self, end: int) -> None:
        """A keyword or number ends before data[end] (lookahead: that byte is not taken)."""
        state, text = self._state, bytes(self._tok)
        self._state = START
        if state == WORD:
            self._token(KEYWORD, text, end)
        elif self._num in ("zero", "digits"):
            self._token(INTEGER, text, end)
        elif self._num in ("mantissa-digits", "exp-digits"):
            self._token(FLOAT, text, end)
        else:  # "-", "1.", "1e", "1e+" at the end of input
            self._lex_error(text)

    def _number(self, data: bytes, i: int) -> int:
        """QEMU's number states: sign, zero, digits, mantissa, mantissa-digits, exp-e,
        exp-sign, exp-digits. A byte no state takes ends an integer or float (lookahead),
        or is an error in a state that needs more."""
        sub = self._num
        if sub in ("digits", "mantissa-digits", "exp-digits"):
            end = _DIGITS.match(data, i).end()
            self._tok += data[i:end]
            i = end
            if i == len(data):
                return i
        c = data[i]
        digit = 0x30 <= c <= 0x39
        nxt = None
        if sub == "sign":
            nxt = "zero" if c == 0x30 else "digits" if digit else None
        elif sub == "zero":
            if digit:
                self._tok.append(c)
                self._lex_error(bytes(self._tok))
                return i + 1
            nxt = "mantissa" if c == 0x2E else "end"
        elif sub == "digits":
            nxt = "mantissa" if c == 0x2E else "exp-e" if c in (0x45, 0x65) else "end"
        elif sub == "mantissa":
            nxt = "mantissa-digits" if digit else None
        elif sub == "mantissa-digits":
            nxt = "exp-e" if c in (0x45, 0x65) else "end"
        elif sub == "exp-e":
            nxt = "exp-sign" if c in (0x2B, 0x2D) else "exp-digits" if digit else None
        elif sub == "exp-sign":
            nxt = "exp-digits" if digit else None
        elif sub == "exp-digits":
            nxt = "end"
        if nxt == "end":
            self._end_word(i)
            return i
        self._tok.append(c)
        if nxt is None:
            self._lex_error(bytes(self._tok))
        else:
            self._num = nxt
        return i + 1


# -- the parser (json_parser_parse), iterative: nesting goes to MAX_NESTING ------------------

_INT64 = (-(1 << 63), (1 << 63) - 1)
_VALUE_START = (LCURLY, LSQUARE, INTEGER, FLOAT, KEYWORD, STRING)
_ESCAPES = {ord('"'): '"', ord("'"): "'", ord("\\"): "\\", ord("/"): "/", ord("b"): "\b", ord("f"): "\f"}
_ESCAPES.update({ord("n"): "\n", ord("r"): "\r", ord("t"): "\t"})


class _ParseError(Exception):
    pass


def parse(tokens: list[tuple[int, bytes]]) -> tuple[Any, str | None]:
    try:
        return _parse(tokens), None
    except _ParseError as e:
        return None, f"JSON parse error, {e}"


def _parse(tokens: list[tuple[int, bytes]]) -> Any:
    pos = 0

    def pop() -> tuple[int, bytes]:
        nonlocal pos
        if pos >= len(tokens):
            raise _ParseError("premature EOI")
        pos += 1
        return tokens[pos - 1]

    def peek() -> int | None:
        return tokens[pos][0] if pos < len(tokens) else None

    # Each frame: [container, kind, pending key]. A value finished at the top of the loop is
    # delivered to the frame below it.
    stack: list[list[Any]] = []
    while True:
        kind, text = pop()
        if kind == LCURLY:
            if peek() is None:
                raise _ParseError("premature EOI")
            if peek() == RCURLY:
                pop()
                value: Any = {}
            else:
                stack.append([{}, "key", None])
                continue
        elif kind == LSQUARE:
            if peek() is None:
                raise _ParseError("premature EOI")
            if peek() == RSQUARE:
                pop()
                value = []
            else:
                stack.append([[], "item", None])
                continue
        elif kind == KEYWORD:
            value = _keyword(text)
        elif kind == STRING:
            value = _string(text)
        elif kind == INTEGER:
            value = _integer(text)
        elif kind == FLOAT:
            value = float(text)
        else:
            raise _ParseError("expecting value")
        # Deliver `value` up the stack, closing the containers it completes.
        while True:
            if not stack:
                return value
            frame = stack[-1]
            container, role = frame[0], frame[1]
            if role == "key":
                if not isinstance(value, str):
                    raise _ParseError("key is not a string in object")
                if pop()[0] != COLON:
                    raise _ParseError("missing : in object pair")
                if value in container:
                    raise _ParseError("duplicate key")
                frame[1], frame[2] = "value", value
                break
            in_dict = role == "value"
            if in_dict:
                container[frame[2]] = value
                frame[1] = "key"
            else:
                container.append(value)  # role "item"
            sep = pop()[0]
            if sep == (RCURLY if in_dict else RSQUARE):
                stack.pop()
                value = container
                continue
            if sep != COMMA:
                raise _ParseError(f"expected separator in {'dict' if in_dict else 'list'}")
            break


def _keyword(text: bytes) -> Any:
    words = {b"true": True, b"false": False, b"null": None}
    if text not in words:
        raise _ParseError(f"invalid keyword '{text.decode()}'")
    return words[text]


def _integer(text: bytes) -> int | float:
    """QEMU's QNum: an int64 if it fits, else a uint64, else a double (strtod)."""
    digits = text.lstrip(b"-")
    if len(digits) <= 20:
        value = int(text)
        if _INT64[0] <= value <= _INT64[1] or 0 <= value < 1 << 64:
            return value
    return float(text)


_HEX4 = re.compile(rb"[0-9a-fA-F]{4}")
_NONCHAR = re.compile("[\ufdd0-\ufdef\ufffe\uffff]|[\U0001fffe-\U0001ffff]")  # is_valid_codepoint


def _string(text: bytes) -> str:
    body = text[1:-1]  # between the quotes
    out: list[str] = []
    i, n = 0, len(body)
    while i < n:
        j = body.find(b"\\", i)
        raw = body[i : n if j < 0 else j]
        if raw:
            out.append(_utf8(raw))
        if j < 0:
            break
        c = body[j + 1]
        if c in _ESCAPES:
            out.append(_ESCAPES[c])
            i = j + 2
            continue
        if c != ord("u"):
            raise _ParseError("invalid escape sequence in string")
        cp, i = _hex4(body, j + 2), j + 6
        if 0xD800 <= cp <= 0xDBFF and body[i : i + 2] == b"\\u":
            trailing = _hex4(body, i + 2)
            cp = 0x10000 + ((cp & 0x3FF) << 10) | (trailing & 0x3FF) if 0xDC00 <= trailing <= 0xDFFF else -1
            if cp >= 0:
                i += 6
        if cp < 0 or not _valid_codepoint(cp):
            raise _ParseError(f"{body[j:i].decode('utf-8', 'replace')} is not a valid Unicode character")
        out.append(chr(cp))
    return "".join(out)


def _hex4(body: bytes, at: int) -> int:
    chunk = body[at : at + 4]
    return int(chunk, 16) if _HEX4.fullmatch(chunk) else -1


def _valid_codepoint(cp: int) -> bool:
    return cp <= 0x10FFFF and (cp & 0xFFFFF800) != 0xD800 and not 0xFDD0 <= cp <= 0xFDEF and (cp & 0xFFFE) != 0xFFFE


def _utf8(raw: bytes) -> str:
    """Modified UTF-8 (mod_utf8_codepoint): "\\xC0\\x80" is NUL; anything invalid, overlong,
    a surrogate or a noncharacter is refused."""
    try:
        text = raw.replace(b"\xc0\x80", b"\x00").decode("utf-8")
    except UnicodeDecodeError:
        raise _ParseError("invalid UTF-8 sequence in string") from None
    if _NONCHAR.search(text):
        raise _ParseError("invalid UTF-8 sequence in string")
    return text
