"""Bytes of a text file → str: UTF-8 (with or without BOM), UTF-16 with BOM, GB18030, else Windows-1252."""

from __future__ import annotations

import codecs
import re

_CJK = re.compile(r"[\u3000-\u303f\u3400-\u4dbf\u4e00-\u9fff\uff00-\uffef]")


def decode_text(data: bytes) -> str:
    """Decode a text file, keeping Chinese text intact; never raises (undecodable bytes become U+FFFD)."""
    if data.startswith(codecs.BOM_UTF8):
        return data[len(codecs.BOM_UTF8):].decode("utf-8", errors="replace")
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return data.decode("utf-16", errors="replace")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    try:
        text = data.decode("gb18030")
    except UnicodeDecodeError:
        text = None
    if text is not None and _looks_chinese(text):
        return text
    return data.decode("cp1252", errors="strict") if _is_cp1252(data) else data.decode("latin-1")


def _looks_chinese(text: str) -> bool:
    """GB18030 decodes many Latin-1 byte pairs too; believe it only when most non-ASCII text is CJK."""
    non_ascii = [char for char in text if ord(char) > 127]
    if not non_ascii:
        return True
    cjk = sum(1 for char in non_ascii if _CJK.match(char))
    return cjk / len(non_ascii) >= 0.9


def _is_cp1252(data: bytes) -> bool:
    try:
        data.decode("cp1252")
    except UnicodeDecodeError:
        return False
    return True
