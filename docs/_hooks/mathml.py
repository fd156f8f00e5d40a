"""mkdocs hook: render the math of pymdownx.arithmatex (generic mode) to MathML at build time.

Browsers render MathML natively, so the site needs no MathJax or KaTeX script from a CDN and
works offline (the browser check serves it on localhost only).
"""

import html
import re

from latex2mathml.converter import convert

_SPAN = re.compile(r'<(span|div) class="arithmatex">(.*?)</\1>', re.S)


def _render(match: re.Match) -> str:
    tag, body = match.group(1), html.unescape(match.group(2)).strip()
    display = tag == "div"
    tex = body[2:-2] if body[:2] in ("\\(", "\\[") else body
    mathml = convert(tex.strip(), display="block" if display else "inline")
    return f'<{tag} class="arithmatex">{mathml}</{tag}>'


def on_page_content(html_text: str, **kwargs) -> str:
    return _SPAN.sub(_render, html_text)
