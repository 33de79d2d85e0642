"""Open-Sora 1.2's prompt conventions, applied before T5 (``scripts/inference.py`` at v1.2.0).

1. **Score suffixes** (``append_score_to_prompts``): the v1.2 sampling config sets ``aes = 6.5`` and ``flow = None``
   (no camera motion), so every prompt gets `` aesthetic score: 6.5.`` appended; with ``flow`` set, also
   `` motion score: {flow:.1f}.``; with ``camera_motion``, `` camera motion: {value}.``. A suffix is skipped when
   the prompt already contains ``aesthetic score:`` / ``motion score:`` / ``camera motion:`` (so users may write
   their own). The model was trained with these scores in its captions; they steer quality and motion.
2. **Cleaning** (``text_preprocessing`` -> DeepFloyd/PixArt ``clean_caption``, applied **twice**): lower-case,
   URLs / @handles / CJK / file names / long numbers removed, dashes and quotes unified, spacing after punctuation
   normalised. This module reproduces that sequence of rules. Two steps use libraries Open-Sora imports: ``ftfy``
   (mojibake repair) and ``bs4`` (HTML tag stripping); they are used when installed, otherwise HTML entities are
   unescaped and tags removed with a regular expression and ftfy's repair is skipped — identical for any prompt
   without broken encodings or HTML markup.
"""

from __future__ import annotations

import html
import re
import urllib.parse

AES_DEFAULT = 6.5  # configs/opensora-v1-2/inference/sample.py
FLOW_DEFAULT: float | None = None


def append_scores(prompt: str, aes: float | None = AES_DEFAULT, flow: float | None = FLOW_DEFAULT,
                  camera_motion: str | None = None) -> str:
    """Open-Sora's score suffixes (see the module docstring)."""
    out = prompt
    if aes is not None and "aesthetic score:" not in prompt:
        out = f"{out} aesthetic score: {aes:.1f}."
    if flow is not None and "motion score:" not in prompt:
        out = f"{out} motion score: {flow:.1f}."
    if camera_motion is not None and "camera motion:" not in prompt:
        out = f"{out} camera motion: {camera_motion}."
    return out


def _fix_text(text: str) -> str:
    try:
        import ftfy
    except ImportError:
        return text
    return ftfy.fix_text(text)


def _strip_html(text: str) -> str:
    try:
        from bs4 import BeautifulSoup
    except ImportError:
        return html.unescape(re.sub(r"<[^<>]*>", "", text))
    return BeautifulSoup(text, features="html.parser").text


_URL = r"\b((?:{scheme}(?:\/{{1,3}}|[a-zA-Z0-9%])|[a-zA-Z0-9.\-]+[.](?:com|co|ru|net|org|edu|gov|it)[\w/-]*\b\/?(?!@)))"
_CJK = ("\u31c0-\u31ef", "\u31f0-\u31ff", "\u3200-\u32ff", "\u3300-\u33ff", "\u3400-\u4dbf", "\u4dc0-\u4dff",
        "\u4e00-\u9fff")
_DASHES = ("\u002D\u058A\u05BE\u1400\u1806\u2010-\u2015\u2E17\u2E1A\u2E3A\u2E3B\u2E40\u301C\u3030\u30A0\uFE31\uFE32"
           "\uFE58\uFE63\uFF0D")
_FILE_EXT = "png|jpg|jpeg|bmp|webp|eps|pdf|apk|mp4"

# (pattern, replacement) applied in order, before and after the basic clean-up (html unescape, mojibake repair).
_RULES_BEFORE: list[tuple[str, str]] = [
    (r"<person>", "person"),
    (_URL.format(scheme="https?:"), ""),
    (_URL.format(scheme="www:"), ""),
]
_RULES_MIDDLE: list[tuple[str, str]] = [
    (r"@[\w\d]+\b", ""),
    *((f"[{r}]+", "") for r in _CJK),
    (f"[{_DASHES}]+", "-"),
    (r"[`´«»“”¨]", '"'),
    (r"[‘’]", "'"),
    (r"&quot;?", ""),
    (r"&amp", ""),
    (r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}", " "),
    (r"\d:\d\d\s+$", ""),
    (r"\\n", " "),
    (r"#\d{1,3}\b", ""),
    (r"#\d{5,}\b", ""),
    (r"\b\d{6,}\b", ""),
    (rf"[\S]+\.(?:{_FILE_EXT})", ""),
    (r"[\"']{2,}", '"'),
    (r"[\.]{2,}", " "),
    (r"[#®•©™&@·º½¾¿¡§~()\[\]{}|\\/*]+", " "),
    (r"\s+\.\s+", " "),
]
_RULES_AFTER: list[tuple[str, str]] = [
    (r"\b[a-zA-Z]{1,3}\d{3,15}\b", ""),
    (r"\b[a-zA-Z]+\d+[a-zA-Z]+\b", ""),
    (r"\b\d+[a-zA-Z]+\d+\b", ""),
    (r"(worldwide\s+)?(free\s+)?shipping", ""),
    (r"(free\s)?download(\sfree)?", ""),
    (r"\bclick\b\s(?:for|on)\s\w+", ""),
    (rf"\b(?:{_FILE_EXT})(\simage[s]?)?", ""),
    (r"\bpage\s+\d+\b", ""),
    (r"\b\d*[a-zA-Z]+\d+[a-zA-Z]+\d+[a-zA-Z\d]*\b", " "),
    (r"\b\d+\.?\d*[xх×]\d+\.?\d*\b", ""),
    (r"\b\s+\:\s+", ": "),
    (r"(\D[,\./])\b", r"\1 "),
    (r"\s+", " "),
    (r"^[\"']([\w\W]+)[\"']$", r"\1"),
    (r"^['_,\-:;]", ""),
    (r"['_,\-:\-+]$", ""),
    (r"^\.\S+$", ""),
]


def _apply(rules: list[tuple[str, str]], text: str) -> str:
    for pattern, repl in rules:
        text = re.sub(pattern, repl, text)
    return text


def clean_caption(caption: str) -> str:
    """One pass of DeepFloyd/PixArt's ``clean_caption`` as Open-Sora uses it (see the module docstring)."""
    text = urllib.parse.unquote_plus(str(caption)).strip().lower()
    text = _apply(_RULES_BEFORE, text)
    text = _strip_html(text)
    text = _apply(_RULES_MIDDLE, text)
    if len(re.findall(r"[-_]", text)) > 3:
        text = re.sub(r"[-_]", " ", text)
    text = html.unescape(html.unescape(_fix_text(text))).strip()
    return _apply(_RULES_AFTER, text).strip()


def preprocess(prompt: str, *, aes: float | None = AES_DEFAULT, flow: float | None = FLOW_DEFAULT,
               camera_motion: str | None = None, clean: bool = True) -> str:
    """The text Open-Sora 1.2 feeds T5 for ``prompt``: score suffixes, then ``clean_caption`` twice
    (``clean=False``: lower-case and strip only, Open-Sora's ``use_text_preprocessing=False``)."""
    text = append_scores(prompt, aes=aes, flow=flow, camera_motion=camera_motion)
    return clean_caption(clean_caption(text)) if clean else text.lower().strip()
