"""Views: graph view, sweep view, lens view, and offline HTML for any plotly figure."""


def offline(fig):
    """Show any plotly figure as self-contained HTML (works offline and in exports).

    >>> from ipy_intervene.widgets import offline
    >>> offline(fig)                       # doctest: +SKIP
    """
    from IPython.display import HTML

    from ipy_intervene.widgets.heatmap import static_html

    return HTML(static_html(fig))
