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


def to_markdown(display):
    header, body = _rows(display)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in body]) + "\n"


def to_csv(long):
    return long.to_csv(index=False)


_LATEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
          "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "±": r"$\pm$", "Δ": r"$\Delta$"}


def _latex(text):
    return "".join(_LATEX.get(c, c) for c in str(text))


def to_latex(display, caption=""):
    """A booktabs tabular (needs \\usepackage{booktabs}) inside a table float."""
    header, body = _rows(display)
    lines = [r"\begin{table}[t]", r"\centering", rf"\caption{{{_latex(caption)}}}" if caption else "",
             r"\begin{tabular}{" + "l" * len(header) + "}", r"\toprule",
             " & ".join(_latex(h) for h in header) + r" \\", r"\midrule"]
    lines += [" & ".join(_latex(c) for c in row) + r" \\" for row in body]
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(line for line in lines if line) + "\n"


def _image(png_bytes, alt, css_class="plot"):
    data = base64.b64encode(png_bytes).decode()
    return f'<img class="{css_class}" alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def to_html(title, sections):
    """One page; sections: (heading, intro text, display table or None, [(caption, png bytes[, css class])]);
    class "grid" draws small images (sample grids) large with sharp pixels."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             ("<style>body{font-family:sans-serif;max-width:1200px;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border-bottom:1px solid #ccc;padding:4px 8px;text-align:left}figure{display:inline-block;"
             "margin:8px}img.plot{max-width:560px}img.grid{width:400px;image-rendering:pixelated}</style>"),
             f"</head><body><h1>{html.escape(title)}</h1>"]
    for heading, intro, display, images in sections:
        parts.append(f"<h2>{html.escape(heading)}</h2><p>{html.escape(intro)}</p>")
        if display is not None:
            header, body = _rows(display)
            parts.append("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>")
            parts += ["<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in body]
            parts.append("</table>")
        for caption, png, *css_class in images:
            image = _image(png, caption, *css_class)
            parts.append(f"<figure>{image}<figcaption>{html.escape(caption)}</figcaption></figure>")
    parts.append("</body></html>")
    return "\n".join(parts)
