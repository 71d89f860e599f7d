"""Views: graph view (and, later, the sweep and lens views)."""
