"""Draw docs/architecture.svg: fitgpt's layers and the imports between them, from the code.

The layers, in order, and the allowed exceptions are read from the import-linter contract in
pyproject.toml (the one that tests/test_layers.py enforces); the imports from grimp's graph of
the package (every import, lazy ones included, `if TYPE_CHECKING:` ones left out, as the
contract counts them); each layer's one-line summary from the first line of its __init__
docstring. An arrow joins two layers when any module of one imports any module of the other:
grey on the right going down (allowed), dashed orange on the left for an exception the contract
lists, red on the left for an import that breaks the layering. Arrows into the base modules
(errors, fileio, console), which every layer may import, are left out.

The picture is plain SVG text with no date in it, so the same code draws the same bytes:

    python bench/draw_layers.py            # writes docs/architecture.svg
    python bench/draw_layers.py --check    # exit 1 if docs/architecture.svg is out of date
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from xml.sax.saxutils import escape

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "architecture.svg"
PKG = "fitgpt"

BOX_W, LINE_H, GAP = 620, 16, 14
LANE0, LANE_STEP = 14, 8
CHARS = 88  # monospace characters per module line in a box (11px in 620px)
COLOURS = {"down": "#8a8a8a", "exception": "#e08a00", "up": "#d62728"}


@dataclass
class Layer:
    """One row of the picture: a subpackage, or a group of modules directly in fitgpt/."""

    names: list[str]  # the contract's entries, e.g. ["cli"] or ["console", "fileio", "errors"]
    title: str
    summary: str = ""
    modules: list[str] = field(default_factory=list)
    y: float = 0.0
    h: float = 0.0


def read_contract(pyproject: Path) -> tuple[list[list[str]], list[str]]:
    """The layers (top first, each a list of module tails) and the ignored imports."""
    conf = tomllib.loads(pyproject.read_text())["tool"]["importlinter"]
    contract = next(c for c in conf["contracts"] if c["type"] == "layers")
    layers = [[n.strip() for n in re.split(r"[|:]", entry)] for entry in contract["layers"]]
    return layers, contract.get("ignore_imports", [])


def import_graph():
    import grimp  # comes with import-linter, a dev dependency

    return grimp.build_graph(PKG, exclude_type_checking_imports=True, cache_dir=None)


def layer_index(module: str, layers: list[list[str]]) -> int | None:
    parts = module.split(".")
    if len(parts) < 2:
        return None  # fitgpt itself (its __version__)
    for i, names in enumerate(layers):
        if parts[1] in names:
            return i
    return None


def matches(pattern: str, importer: str, imported: str) -> bool:
    """import-linter's ignore_imports form: 'a.b -> c.**' (* one name, ** any depth)."""
    def rx(side: str) -> str:
        return "".join(".*" if p == "**" else "[^.]+" if p == "*" else re.escape(p)
                       for p in re.split(r"(\*\*|\*)", side.strip())) + "$"

    left, right = pattern.split("->")
    return bool(re.match(rx(left), importer) and re.match(rx(right), imported))


def layer_edges(graph, layers: list[list[str]], ignored: list[str]) -> dict[tuple[int, int], str]:
    """(importer layer, imported layer) -> 'down', 'exception' or 'up'; none into the bottom
    layer (the base modules), which every layer may import."""
    edges: dict[tuple[int, int], str] = {}
    for importer in sorted(m for m in graph.modules if m.startswith(PKG)):
        a = layer_index(importer, layers)
        for imported in sorted(graph.find_modules_directly_imported_by(importer)):
            b = layer_index(imported, layers)
            if a is None or b is None or a == b or b == len(layers) - 1:
                continue
            if a < b:
                kind = "down"
            elif any(matches(p, importer, imported) for p in ignored):
                kind = "exception"
            else:
                kind = "up"
            if edges.get((a, b)) != "up":  # one breaking import makes the pair red
                edges[(a, b)] = kind
    return edges


def first_doc_line(path: Path) -> str:
    doc = ast.get_docstring(ast.parse(path.read_text())) if path.exists() else None
    return (doc or "").splitlines()[0] if doc else ""


def module_list(graph, package: str) -> list[str]:
    """Modules of a subpackage relative to it, a nested subpackage as 'sub/ (a, b, c)'."""
    direct, nested = [], {}
    for m in sorted(graph.modules):
        if not m.startswith(package + "."):
            continue
        rest = m[len(package) + 1:].split(".")
        if len(rest) == 1 and not graph.find_children(m):
            direct.append(rest[0])
        elif len(rest) == 2:
            nested.setdefault(rest[0], []).append(rest[1])
    return direct + [f"{sub}/ ({', '.join(mods)})" for sub, mods in sorted(nested.items())]


def make_layers(graph, contract: list[list[str]]) -> list[Layer]:
    out = []
    for names in contract:
        pkg_dir = ROOT / PKG / names[0]
        if len(names) == 1 and pkg_dir.is_dir():
            out.append(Layer(names, names[0] + "/", first_doc_line(pkg_dir / "__init__.py"),
                             module_list(graph, f"{PKG}.{names[0]}")))
        else:
            title = ", ".join(n + ".py" for n in names)
            summary = "python -m fitgpt" if names == ["__main__"] else "(every layer may import them)"
            out.append(Layer(names, title, summary))
    return out


def wrap(items: list[str], width: int) -> list[str]:
    lines, cur = [], ""
    for item in items:
        nxt = f"{cur}, {item}" if cur else item
        if len(nxt) > width and cur:
            lines.append(cur + ",")
            cur = item
        else:
            cur = nxt
    return lines + [cur] if cur else lines


def place(layers: list[Layer], top: float) -> float:
    """Set each box's y and height; return the y below the last box."""
    y = top
    for layer in layers:
        layer.h = LINE_H * (1 + len(wrap(layer.modules, CHARS))) + 12
        layer.y = y
        y += layer.h + GAP
    return y


def lanes(pairs: list[tuple[int, int]]) -> dict[tuple[int, int], int]:
    """A lane (distance from the boxes) per edge: short spans inside, and no two edges that
    overlap in height share a lane."""
    taken: list[list[tuple[int, int]]] = []
    out = {}
    for a, b in sorted(pairs, key=lambda p: (abs(p[0] - p[1]), min(p), max(p))):
        lo, hi = min(a, b), max(a, b)
        for i, spans in enumerate(taken):
            if all(hi <= s_lo or lo >= s_hi for s_lo, s_hi in spans):
                spans.append((lo, hi))
                out[(a, b)] = i
                break
        else:
            taken.append([(lo, hi)])
            out[(a, b)] = len(taken) - 1
    return out


def n_lanes(pairs: list[tuple[int, int]]) -> int:
    return max(lanes(pairs).values(), default=-1) + 1


def arrow(x_box: float, side: int, lane: int, y1: float, y2: float, kind: str) -> str:
    """A bracket from (x_box, y1) out to the lane, along it, and back in to (x_box, y2)."""
    x = x_box + side * (LANE0 + LANE_STEP * lane)
    dash = ' stroke-dasharray="5,3"' if kind == "exception" else ""
    return (f'<path d="M{x_box:.0f},{y1:.1f} H{x:.0f} V{y2:.1f} H{x_box + side * 2:.0f}" fill="none" '
            f'stroke="{COLOURS[kind]}" stroke-width="1.3"{dash} marker-end="url(#{kind})"/>')


def split(edges: dict[tuple[int, int], str]) -> tuple[list, list]:
    """(downward pairs, drawn on the right; the others, on the left)."""
    return [p for p, k in edges.items() if k == "down"], [p for p, k in edges.items() if k != "down"]


def draw_edges(layers: list[Layer], edges: dict[tuple[int, int], str], box_x: float) -> list[str]:
    """Downward edges on the right (leaving a box low, arriving high), the others on the left."""
    down, other = split(edges)
    out = []
    for pairs, x_box, side in ((down, box_x + BOX_W, 1), (other, box_x, -1)):
        for (a, b), lane in sorted(lanes(pairs).items()):
            la, lb = layers[a], layers[b]
            y1 = la.y + la.h * (0.7 if side == 1 else 0.3)
            y2 = lb.y + lb.h * (0.3 if side == 1 else 0.7)
            out.append(arrow(x_box, side, lane, y1, y2, edges[(a, b)]))
    return out


def draw_box(layer: Layer, x: float) -> list[str]:
    y = layer.y
    out = [f'<rect x="{x}" y="{y:.1f}" width="{BOX_W}" height="{layer.h:.1f}" rx="6" fill="#f4f6fb" '
           f'stroke="#4a5a80"/>',
           f'<text x="{x + 10}" y="{y + 18:.1f}" class="t"><tspan class="b">{escape(layer.title)}</tspan>'
           f'<tspan dx="8">{escape(layer.summary)}</tspan></text>']
    for i, line in enumerate(wrap(layer.modules, CHARS)):
        out.append(f'<text x="{x + 14}" y="{y + 18 + LINE_H * (i + 1):.1f}" class="m">{escape(line)}</text>')
    return out


def legend(x0: float, y: float) -> list[str]:
    items = [("down", "imports a lower layer"), ("exception", "an exception the contract lists"),
             ("up", "breaks the layering")]
    out = []
    for i, (kind, text) in enumerate(items):
        x = x0 + i * 250
        dash = ' stroke-dasharray="5,3"' if kind == "exception" else ""
        out.append(f'<line x1="{x}" y1="{y:.1f}" x2="{x + 28}" y2="{y:.1f}" stroke="{COLOURS[kind]}" '
                   f'stroke-width="1.3"{dash} marker-end="url(#{kind})"/>')
        out.append(f'<text x="{x + 36}" y="{y + 4:.1f}" class="m">{text}</text>')
    return out


def render(layers: list[Layer], edges: dict[tuple[int, int], str]) -> str:
    top = 44
    bottom = place(layers, top)
    down, other = split(edges)
    box_x = LANE0 + LANE_STEP * max(n_lanes(other), 3) + 10
    width = box_x + BOX_W + LANE0 + LANE_STEP * n_lanes(down) + 10
    height = bottom + 30
    markers = "".join(
        f'<marker id="{k}" viewBox="0 0 8 8" refX="7" refY="4" markerWidth="7" markerHeight="7" '
        f'orient="auto"><path d="M0,0 L8,4 L0,8 z" fill="{c}"/></marker>' for k, c in COLOURS.items())
    head = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
            f'viewBox="0 0 {width:.0f} {height:.0f}" font-family="DejaVu Sans, Arial, sans-serif">',
            "<style>.t{font-size:12px}.b{font-weight:bold}.m{font-size:11px;font-family:DejaVu Sans Mono,"
            "Menlo,Consolas,monospace;fill:#333}.h{font-size:15px;font-weight:bold}</style>",
            f"<defs>{markers}</defs>",
            f'<rect width="{width:.0f}" height="{height:.0f}" fill="white"/>',
            f'<text x="{box_x}" y="26" class="h">fitgpt: each layer imports only the layers below it</text>']
    body = [s for layer in layers for s in draw_box(layer, box_x)]
    return "\n".join(head + draw_edges(layers, edges, box_x) + body + legend(box_x, bottom + 10)
                     + ["</svg>"]) + "\n"


def draw() -> str:
    contract, ignored = read_contract(ROOT / "pyproject.toml")
    graph = import_graph()
    return render(make_layers(graph, contract), layer_edges(graph, contract, ignored))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="compare with the file instead of writing it")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    svg = draw()
    if args.check:
        if not args.out.exists() or args.out.read_text() != svg:
            print(f"{args.out} is out of date: run python bench/draw_layers.py", file=sys.stderr)
            return 1
        print(f"{args.out} is current")
        return 0
    args.out.write_text(svg)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
