"""Plotly pages: the HTML files the analyses and the command lines write beside their JSON."""

from __future__ import annotations

__all__ = ["page"]


def page(figs: list, title: str) -> str:
    """A standalone HTML page with ``figs``; plotly's JavaScript is inlined once (nothing loaded from the network)."""
    body = "\n".join(
        f.to_html(full_html=False, include_plotlyjs="inline" if i == 0 else False) for i, f in enumerate(figs)
    )
    return f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title></head><body>{body}</body></html>"
