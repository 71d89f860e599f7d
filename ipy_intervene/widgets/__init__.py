"""Views: graph view, sweep view, lens view, and offline HTML for any plotly figure."""


def offline(fig):
    """Show any plotly figure as self-contained HTML (works offline and in exports) with its
    SVG image (shown where only images are: a code-hosting preview, an offline export).

    >>> from ipy_intervene.widgets import offline
    >>> offline(fig)                       # doctest: +SKIP
    """
    from ipy_intervene.widgets.static import StaticFigure

    return StaticFigure(fig)
