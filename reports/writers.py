"""A study table as Markdown, CSV (the unformatted numbers), LaTeX (booktabs) and one self-contained
HTML page with the plots and sample grids inlined."""
import base64
import html


def _rows(display):
    """Header and body rows (strings) of a display table, its index levels first."""
    names = [n for n in display.index.names if n is not None]
    header = names + list(display.columns)
    body = []
    for index, values in zip(display.index, display.itertuples(index=False)):
        labels = list(index) if isinstance(index, tuple) else ([index] if names else [])
        body.append([str(v) for v in labels + list(values)])
    return header, body


def to_markdown(display, notes=()):
    """A pipe table, each note a paragraph under it."""
    header, body = _rows(display)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    table = "\n".join(lines + ["| " + " | ".join(row) + " |" for row in body]) + "\n"
    return table + "".join(f"\n{note}\n" for note in notes)


def to_csv(long, notes=()):
    """The long table, each note a leading '# ' line (read it back with pandas.read_csv(path, comment="#"));
    a list of values is written space-separated."""
    plain = long.map(lambda v: " ".join(map(str, v)) if isinstance(v, list) else v)
    return "".join(f"# {note}\n" for note in notes) + plain.to_csv(index=False)


_LATEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
          "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "±": r"$\pm$", "Δ": r"$\Delta$"}


def _latex(text):
    return "".join(_LATEX.get(c, c) for c in str(text)).replace("--", "-{}-")  # "--" would print an en dash


def to_latex(display, caption="", notes=()):
    """A booktabs tabular (needs \\usepackage{booktabs}) inside a table float, the notes in small type under it."""
    header, body = _rows(display)
    lines = [r"\begin{table}[t]", r"\centering", rf"\caption{{{_latex(caption)}}}" if caption else "",
             r"\begin{tabular}{" + "l" * len(header) + "}", r"\toprule",
             " & ".join(_latex(h) for h in header) + r" \\", r"\midrule"]
    lines += [" & ".join(_latex(c) for c in row) + r" \\" for row in body]
    lines += [r"\bottomrule", r"\end{tabular}"]
    lines += [r"\par\smallskip{\footnotesize " + _latex(note) + "}" for note in notes]
    lines += [r"\end{table}"]
    return "\n".join(line for line in lines if line) + "\n"


def _image(png_bytes, alt, css_class="plot"):
    data = base64.b64encode(png_bytes).decode()
    return f'<img class="{css_class}" alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _cell(text, seeds=""):
    """A table cell; seeds: the finished seeds' values, shown small beside the mean."""
    extra = f' <span class="seeds" title="finished seeds">{html.escape(seeds)}</span>' if seeds else ""
    return f"<td>{html.escape(text)}{extra}</td>"


def _findings_html(verdicts):
    """The page's opening section: each finding's verdict, claim, evidence and what would settle it."""
    if not verdicts:
        return []
    parts = ["<h2>Findings</h2>"]
    for v in verdicts:
        lines = v.evidence + ([v.settle] if v.settle else [])
        parts.append(f'<p class="finding {v.verdict}"><b>{html.escape(v.finding.name)}: {v.verdict.upper()}</b>: '
                     f"{html.escape(v.finding.what())}</p><ul>"
                     + "".join(f"<li>{html.escape(line)}</li>" for line in lines) + "</ul>")
    return parts


def to_html(title, sections, verdicts=()):
    """One page, opening with the findings' verdicts (nvae_platform.verdicts.Verdict); sections: (heading, intro text, table or None, [(caption, png bytes[, css class])]), a table
    having .display, .seeds (display's shape: the seed values to show beside a cell) and .notes; class
    "grid" draws small images (sample grids) large with sharp pixels."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             ("<style>body{font-family:sans-serif;max-width:1200px;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border-bottom:1px solid #ccc;padding:4px 8px;text-align:left}figure{display:inline-block;"
             "margin:8px}img.plot{max-width:560px}img.grid{width:400px;image-rendering:pixelated}"
             ".seeds{font-size:smaller;color:#777}p.note{font-size:smaller}.reproduced b{color:#060}"
             ".contradicted b{color:#a00}.open b{color:#a60}</style>"),
             f"</head><body><h1>{html.escape(title)}</h1>", *_findings_html(verdicts)]
    for heading, intro, table, images in sections:
        parts.append(f"<h2>{html.escape(heading)}</h2><p>{html.escape(intro)}</p>")
        if table is not None:
            header, body = _rows(table.display)
            parts.append("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>")
            for row, values in zip(body, table.seeds.itertuples(index=False)):
                labels = len(row) - len(values)  # the index's cells come first
                cells = [_cell(c) for c in row[:labels]] + [_cell(c, s) for c, s in zip(row[labels:], values)]
                parts.append("<tr>" + "".join(cells) + "</tr>")
            parts.append("</table>")
            parts += [f'<p class="note">{html.escape(note)}</p>' for note in table.notes]
        for caption, png, *css_class in images:
            image = _image(png, caption, *css_class)
            parts.append(f"<figure>{image}<figcaption>{html.escape(caption)}</figcaption></figure>")
    parts.append("</body></html>")
    return "\n".join(parts)
