"""The intervention graph of a cell: a plain data structure (no torch), with DOT export.

The compiler builds it from the cell's AST; validation resolves its module paths; the
runtime annotates it with what ran (shapes, steps, branches, iterations).

>>> g = InterventionGraph(source="h = model.transformer.h[0].output")
>>> g.add_region("invoke", line=1, label="invoke 0")
0
>>> g.sites                                    # filled by ipy_intervene.compiler.compile
[]
"""

from __future__ import annotations

from dataclasses import dataclass, field

ACCESS_STYLE = {
    "read": ("ellipse", "#e8f0fe"),
    "write": ("box", "#fde2e1"),
    "edit": ("box", "#fde2e1"),
    "skip": ("box", "#fff3cd"),
    "call": ("hexagon", "#e6f4ea"),
}


@dataclass
class Visit:
    """One time a site was reached during a run."""

    step: int
    shape: tuple[int, ...] | None
    dtype: str | None


@dataclass
class Site:
    """A place the cell reads or changes the model: ``model.transformer.h[2].output``."""

    id: int
    line: int
    path: str                 # "transformer.h[2]"; symbolic indices keep their source: "h[l]"
    attr: str                 # output | input | inputs | skip | call | model_output
    access: str               # read | write | edit | skip | call
    invoke: int | None
    region: int
    statement: int
    symbolic: bool = False
    visits: list[Visit] = field(default_factory=list)

    @property
    def label(self) -> str:
        if self.attr == "model_output":
            return "tracer.output"
        if self.attr in ("call", "skip"):
            return f"{self.path}({'…' if self.attr == 'call' else 'skip'})"
        return f"{self.path}.{self.attr}"


@dataclass
class Region:
    """A block of the cell: the cell itself, an invoke, an ``if``/``for``/``while`` body."""

    id: int
    kind: str                 # cell | before | invoke | after | if | for | while | steps | def
    line: int
    label: str
    parent: int | None
    entered: int = 0          # times the region's header ran (loops: iterations)
    taken: int = 0            # if/while: times the test was true


@dataclass
class Statement:
    """One simple statement (or compound header) with the names it binds and uses."""

    id: int
    line: int
    text: str
    region: int
    defs: tuple[str, ...]
    uses: tuple[str, ...]


@dataclass
class InterventionGraph:
    """Invokes, sites, control-flow regions and dataflow of one cell."""

    source: str
    sites: list[Site] = field(default_factory=list)
    regions: list[Region] = field(default_factory=list)
    statements: list[Statement] = field(default_factory=list)
    edges: list[tuple[int, int, str]] = field(default_factory=list)  # (from stmt, to stmt, name)
    published: list[str] = field(default_factory=list)
    invokes: list[int] = field(default_factory=list)                  # region id per invoke
    failed_line: int | None = None

    def add_region(self, kind: str, *, line: int, label: str, parent: int | None = None) -> int:
        self.regions.append(Region(len(self.regions), kind, line, label, parent))
        return len(self.regions) - 1

    def site(self, site_id: int | None) -> Site | None:
        return self.sites[site_id] if site_id is not None and 0 <= site_id < len(self.sites) else None

    def add_dynamic_site(self, *, line: int, path: str, attr: str, access: str,
                         invoke: int | None) -> Site:
        """A site reached through an alias the compiler could not see (``blk.output``)."""
        region = self.invokes[invoke] if invoke is not None and self.invokes else 0
        site = Site(len(self.sites), line, path, attr, access, invoke, region, -1)
        self.sites.append(site)
        return site

    def module_sites(self) -> list[Site]:
        """Sites on modules (calls on things that are not modules are left out)."""
        return [s for s in self.sites if s.access != "plain"]

    # -- text ------------------------------------------------------------------------------

    def summary(self) -> str:
        """One line per site, grouped by invoke: what a person reads in ``--dry-run``."""
        sites = self.module_sites()
        lines = [f"InterventionGraph: {len(self.invokes)} invoke(s), {len(sites)} site(s)"]
        for site in sorted(sites, key=lambda s: (s.invoke if s.invoke is not None else -1, s.line)):
            where = f"invoke {site.invoke}" if site.invoke is not None else "outside invokes"
            seen = ""
            if site.visits:
                v = site.visits[-1]
                seen = f"  {list(v.shape) if v.shape else ''} {v.dtype or ''} x{len(site.visits)}"
            lines.append(f"  line {site.line:>3}  {where:<10} {site.access:<5} {site.label}{seen}")
        for region in self.regions:
            if region.kind in ("if", "while") and region.entered:
                lines.append(f"  line {region.line:>3}  {region.kind} {region.label}: "
                             f"true {region.taken} of {region.entered}")
            elif region.kind in ("for", "steps") and region.entered:
                lines.append(f"  line {region.line:>3}  {region.kind} {region.label}: "
                             f"{region.entered} iteration(s)")
        if self.published:
            lines.append("  publishes: " + ", ".join(self.published))
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (f"<InterventionGraph invokes={len(self.invokes)} sites={len(self.sites)} "
                f"published={self.published}>")

    def _repr_pretty_(self, p, cycle: bool) -> None:
        p.text(self.summary())

    # -- DOT -------------------------------------------------------------------------------

    def to_dot(self) -> str:
        """Graphviz DOT text: one cluster per invoke and per control-flow region."""
        out = ["digraph intervention {", '  rankdir=TB; node [fontname="Helvetica", fontsize=10];']
        children: dict[int | None, list[Region]] = {}
        for region in self.regions:
            children.setdefault(region.parent, []).append(region)
        for region in children.get(None, []):
            self._dot_region(region, children, out, indent="  ")
        out.extend(self._dot_edges())
        out.append("}")
        return "\n".join(out)

    def _dot_region(self, region: Region, children, out: list[str], indent: str) -> None:
        clustered = region.kind != "cell"
        inner = indent + "  " if clustered else indent
        if clustered:
            out.append(f"{indent}subgraph cluster_r{region.id} {{")
            out.append(f'{inner}label="{_esc(self._region_caption(region))}"; style=rounded;')
        for stmt in self.statements:
            if stmt.region == region.id:
                out.append(inner + self._dot_statement(stmt))
        for site in self.module_sites():
            if site.region == region.id and site.statement < 0:
                out.append(inner + self._dot_site_node(site))
        for child in children.get(region.id, []):
            self._dot_region(child, children, out, inner)
        if clustered:
            out.append(f"{indent}}}")

    def _region_caption(self, region: Region) -> str:
        caption = f"{region.label} (line {region.line})"
        if region.kind in ("if", "while") and region.entered:
            caption += f" — true {region.taken}/{region.entered}"
        elif region.kind in ("for", "steps") and region.entered:
            caption += f" — {region.entered} iterations"
        return caption

    def _dot_statement(self, stmt: Statement) -> str:
        sites = [s for s in self.module_sites() if s.statement == stmt.id]
        published = [d for d in stmt.defs if d in self.published]
        parts = [f"{stmt.line}: {stmt.text}"]
        for site in sites:
            shape = f" {list(site.visits[-1].shape)}" if site.visits and site.visits[-1].shape else ""
            parts.append(f"{site.access} {site.label}{shape}")
        if published:
            parts.append("→ " + ", ".join(published))
        shape, color = ACCESS_STYLE.get(sites[0].access if sites else "", ("plaintext", "white"))
        if any(s.access in ("write", "edit", "skip") for s in sites):
            shape, color = ACCESS_STYLE["write"]
        pen = ', penwidth=2, color="#d93025"' if stmt.line == self.failed_line else ""
        bold = ", fontname=\"Helvetica-Bold\"" if published else ""
        label = "\\n".join(_esc(part) for part in parts)
        return (f's{stmt.id} [label="{label}", shape={shape}, style=filled, '
                f'fillcolor="{color}"{pen}{bold}];')

    def _dot_site_node(self, site: Site) -> str:
        shape, color = ACCESS_STYLE.get(site.access, ("ellipse", "white"))
        return (f'd{site.id} [label="{site.line}: {_esc(site.access + " " + site.label)}", '
                f'shape={shape}, style="filled,dashed", fillcolor="{color}"];')

    def _dot_edges(self) -> list[str]:
        return [f'  s{a} -> s{b} [label="{_esc(name)}", fontsize=8];' for a, b, name in self.edges]


def _esc(text: str) -> str:
    """Escape text for a double-quoted DOT string."""
    return text.replace("\\", "\\\\").replace('"', '\\"')
