"""``GET /docs``: the server's API reference as one self-contained HTML page.

FastAPI's own ``/docs`` loads Swagger UI's scripts and styles from a CDN, so on the offline
machines medical-imaging groups often serve from it is a blank page. This page is rendered on
the server from the same OpenAPI document (``/openapi.json``, still served for tools): every
path and method with its summary, description, request fields (type, default, limits, whether
required) and response codes — no scripts, no external resources, everything escaped.
"""

from __future__ import annotations

import html
from typing import Any

_LIMITS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "minLength", "maxLength", "minItems",
           "maxItems", "enum")


def _resolve(schema: dict, spec: dict) -> dict:
    while "$ref" in schema:
        node: Any = spec
        for part in schema["$ref"].lstrip("#/").split("/"):
            node = node.get(part, {})
        schema = node
    return schema


def _type(schema: dict, spec: dict) -> str:
    schema = _resolve(schema, spec)
    if "anyOf" in schema:
        return " | ".join(_type(s, spec) for s in schema["anyOf"])
    if schema.get("type") == "array":
        return f"list[{_type(schema.get('items', {}), spec)}]"
    if "const" in schema:
        return repr(schema["const"])
    return schema.get("type") or schema.get("title") or "any"


def _fields(schema: dict, spec: dict) -> str:
    schema = _resolve(schema, spec)
    props = schema.get("properties") or {}
    if not props:
        return ""
    required = set(schema.get("required") or [])
    rows = []
    for name, p in props.items():
        p2 = _resolve(p, spec)
        limits = ", ".join(f"{k} {p2[k]!r}" for k in _LIMITS if k in p2)
        default = "required" if name in required else f"default {p.get('default', p2.get('default'))!r}"
        rows.append(f"<tr><td><code>{html.escape(name)}</code></td><td>{html.escape(_type(p, spec))}</td>"
                    f"<td>{html.escape(default)}</td><td>{html.escape(limits)}</td></tr>")
    return ("<table><tr><th>field</th><th>type</th><th>default</th><th>limits</th></tr>" + "".join(rows) +
            "</table>")


def render_docs(spec: dict) -> str:
    """The HTML page for an OpenAPI document."""
    info = spec.get("info", {})
    parts = [f"<h1>{html.escape(info.get('title', 'API'))} {html.escape(str(info.get('version', '')))}</h1>",
             f"<p>{html.escape(info.get('description', ''))}</p>",
             "<p>The machine-readable document is at <a href='/openapi.json'>/openapi.json</a>.</p>"]
    for path, methods in spec.get("paths", {}).items():
        for method, op in methods.items():
            parts.append(f"<h2><span class='m'>{html.escape(method.upper())}</span> <code>{html.escape(path)}</code>"
                         f"</h2><p><b>{html.escape(op.get('summary', ''))}</b></p>")
            if op.get("description"):
                parts.append(f"<pre>{html.escape(op['description'])}</pre>")
            body = (op.get("requestBody") or {}).get("content", {}).get("application/json", {}).get("schema")
            if body:
                parts.append(_fields(body, spec))
            codes = ", ".join(f"{html.escape(c)} {html.escape(r.get('description', ''))}"
                              for c, r in (op.get("responses") or {}).items())
            parts.append(f"<p class='r'>responses: {codes}</p>")
    style = ("body{font:15px/1.45 system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#222}"
             "h2{font-size:1.05rem;margin-top:1.8rem;border-top:1px solid #ddd;padding-top:.8rem}"
             ".m{background:#245;color:#fff;padding:.1rem .4rem;border-radius:3px;font-size:.85rem}"
             "table{border-collapse:collapse;font-size:.9rem}td,th{border:1px solid #ccc;padding:.2rem .5rem;"
             "text-align:left}pre{white-space:pre-wrap;background:#f6f6f6;padding:.5rem}.r{color:#555;font-size:.9rem}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(info.get('title', 'API'))} API"
            f"</title><style>{style}</style></head><body>{''.join(parts)}</body></html>")
