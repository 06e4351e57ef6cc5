"""Writes the small offline task set under sdt/search/tasks/ that CoLa search and its tests use (docs/cola.md).

Everything here is written for this project (no third-party data): arithmetic items generated from a fixed seed,
and general-knowledge questions written by hand. Run from the repository root: `python scripts/make_cola_tasks.py`.
"""

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "sdt" / "search" / "tasks"

# (question, correct answer, three wrong answers): common knowledge a small instruct model may know.
FACTS = [
    ("What is the capital of France?", "Paris", ["London", "Rome", "Madrid"]),
    ("What is the capital of Japan?", "Tokyo", ["Beijing", "Seoul", "Bangkok"]),
    ("What is the capital of Italy?", "Rome", ["Paris", "Berlin", "Vienna"]),
    ("What is the capital of Germany?", "Berlin", ["Munich", "Paris", "Warsaw"]),
    ("What is the capital of Spain?", "Madrid", ["Lisbon", "Rome", "Barcelona"]),
    ("What is the capital of the United Kingdom?", "London", ["Dublin", "Paris", "Edinburgh"]),
    ("What is the capital of Egypt?", "Cairo", ["Nairobi", "Tunis", "Baghdad"]),
    ("What is the capital of Russia?", "Moscow", ["Kiev", "Warsaw", "Minsk"]),
    ("What is the capital of China?", "Beijing", ["Shanghai", "Tokyo", "Hong Kong"]),
    ("What is the capital of Canada?", "Ottawa", ["Toronto", "Vancouver", "Chicago"]),
    ("What color is the sky on a clear day?", "blue", ["green", "red", "brown"]),
    ("What color is grass?", "green", ["blue", "purple", "white"]),
    ("What color is snow?", "white", ["black", "green", "orange"]),
    ("What color is a ripe banana?", "yellow", ["blue", "purple", "black"]),
    ("What color do you get by mixing blue and yellow?", "green", ["red", "orange", "pink"]),
    ("How many legs does a spider have?", "eight", ["six", "four", "ten"]),
    ("How many legs does a dog have?", "four", ["two", "six", "eight"]),
    ("How many days are in a week?", "seven", ["five", "six", "ten"]),
    ("How many months are in a year?", "twelve", ["ten", "eleven", "fourteen"]),
    ("How many hours are in a day?", "twenty-four", ["twelve", "sixty", "ten"]),
    ("How many minutes are in an hour?", "sixty", ["thirty", "one hundred", "twelve"]),
    ("Which animal says moo?", "a cow", ["a cat", "a dog", "a duck"]),
    ("Which animal barks?", "a dog", ["a cat", "a fish", "a cow"]),
    ("Which animal is known as the king of the jungle?", "the lion", ["the mouse", "the rabbit", "the sheep"]),
    ("Which animal has a trunk?", "the elephant", ["the horse", "the cat", "the snake"]),
    ("What do bees make?", "honey", ["milk", "silk", "wool"]),
    ("What do cows give us to drink?", "milk", ["juice", "coffee", "oil"]),
    ("What is frozen water called?", "ice", ["steam", "sand", "glass"]),
    ("At what temperature in Celsius does water freeze?", "0 degrees", ["50 degrees", "100 degrees", "20 degrees"]),
    ("At what temperature in Celsius does water boil?", "100 degrees", ["0 degrees", "50 degrees", "10 degrees"]),
    ("Which planet do we live on?", "Earth", ["Mars", "Jupiter", "Venus"]),
    ("Which planet is known as the red planet?", "Mars", ["Venus", "Saturn", "Neptune"]),
    (
        "What is the largest ocean on Earth?",
        "the Pacific Ocean",
        ["the Indian Ocean", "the Arctic Ocean", "the Baltic Sea"],
    ),
    ("What gas do plants take in from the air?", "carbon dioxide", ["helium", "neon", "hydrogen"]),
    ("What is the opposite of hot?", "cold", ["warm", "big", "fast"]),
    ("What is the opposite of up?", "down", ["left", "over", "high"]),
    ("What is the opposite of big?", "small", ["large", "tall", "heavy"]),
    ("What is the opposite of day?", "night", ["noon", "morning", "week"]),
    ("Which day comes after Monday?", "Tuesday", ["Sunday", "Friday", "Thursday"]),
    ("Which month comes after January?", "February", ["March", "December", "June"]),
    ("What do you use to write on paper?", "a pen", ["a spoon", "a shoe", "a cup"]),
    ("Where do fish live?", "in water", ["in trees", "in the desert", "in the sky"]),
    ("What do we call a baby cat?", "a kitten", ["a puppy", "a calf", "a foal"]),
    ("What do we call a baby dog?", "a puppy", ["a kitten", "a lamb", "a chick"]),
    ("Which is the largest planet in our solar system?", "Jupiter", ["Earth", "Mars", "Mercury"]),
]


def arithmetic(rng: random.Random, n: int) -> list[dict]:
    items = []
    while len(items) < n:
        a, b = rng.randint(1, 20), rng.randint(1, 20)
        op = rng.choice(["+", "-", "*"] if len(items) % 3 else ["+"])
        if op == "-" and b > a:
            a, b = b, a
        if op == "*":
            a, b = rng.randint(2, 9), rng.randint(2, 9)
        value = {"+": a + b, "-": a - b, "*": a * b}[op]
        wrong = set()
        while len(wrong) < 3:
            w = value + rng.choice([-10, -2, -1, 1, 2, 10])
            if w >= 0 and w != value:
                wrong.add(w)
        items.append({"question": f"What is {a} {op} {b}?", "answer": str(value), "wrong": sorted(wrong)})
    return items


def multiple_choice(question: str, answer: str, wrong: list[str], rng: random.Random) -> dict:
    choices = [answer, *wrong]
    rng.shuffle(choices)
    return {"question": question, "choices": choices, "answer": choices.index(answer)}


def main() -> None:
    rng = random.Random(8)
    sums = arithmetic(rng, 75)
    mc = [multiple_choice(q, a, w, rng) for q, a, w in FACTS]
    mc += [multiple_choice(s["question"], s["answer"], [str(w) for w in s["wrong"]], rng) for s in sums]
    rng.shuffle(mc)
    qa = [{"question": s["question"], "answer": s["answer"]} for s in arithmetic(random.Random(9), 40)]
    OUT.mkdir(parents=True, exist_ok=True)
    for name, rows in (("basic_mc", mc), ("arithmetic_qa", qa)):
        with open(OUT / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        print(f"wrote {len(rows)} items to {OUT / name}.jsonl")


if __name__ == "__main__":
    main()
