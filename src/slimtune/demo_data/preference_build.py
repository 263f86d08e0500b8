"""Builds the preference demo's data (preference_train.jsonl, preference_heldout.jsonl):
python preference_build.py

The preference: answer a simple question in one plain sentence, not in the chatty,
padded style that SmolLM2-135M-Instruct falls into. Each row is TRL's conversational
preference format, with the same fact in both answers, so only the style differs:

    prompt:   [{"role": "user", "content": "How many legs does a spider have?"}]
    chosen:   [{"role": "assistant", "content": "A spider has eight legs."}]
    rejected: [{"role": "assistant", "content": "A spider has eight legs. There is a lot
               more to say about this, so let me explain. ... I hope this helps!"}]

The held-out rows ask about countries, animals, words and numbers never used in training,
and two kinds of question that training never asks, so what the model learns is the
style, not the answers.
"""

import json
import random
from pathlib import Path

CAPITALS = """France Paris|Italy Rome|Spain Madrid|Germany Berlin|Japan Tokyo|Egypt Cairo|Peru Lima
Norway Oslo|Austria Vienna|Ireland Dublin|Greece Athens|Portugal Lisbon|Russia Moscow|China Beijing
Kenya Nairobi|Cuba Havana|Chile Santiago|Poland Warsaw|Sweden Stockholm|Finland Helsinki
Hungary Budapest|Denmark Copenhagen|Belgium Brussels|Turkey Ankara|Canada Ottawa|Mexico Mexico City
Thailand Bangkok|Vietnam Hanoi|Iran Tehran|Iraq Baghdad|Ghana Accra|Nepal Kathmandu
Argentina Buenos Aires|Colombia Bogota|Australia Canberra|Romania Bucharest"""
LEGS = """spider eight|ant six|dog four|cat four|chicken two|horse four|beetle six|crab ten
duck two|cow four|bee six|goat four|owl two|fly six|sheep four|pig four|frog four|scorpion eight
lobster ten|parrot two|mouse four|butterfly six|ostrich two|camel four|tick eight"""
COLOURS = """grass green|snow white|a banana yellow|coal black|a tomato red|the sky on a clear day blue
a carrot orange|milk white|a lemon yellow|a ripe strawberry red|chocolate brown|a lime green
an orange orange|charcoal black|a plum purple|a pumpkin orange|salt white|a cucumber green
blood red|a crow black|an eggplant purple|soot black|a daisy's centre yellow"""
OPPOSITES = """hot cold|big small|up down|fast slow|old young|happy sad|light dark|open closed
early late|full empty|hard soft|wet dry|loud quiet|rich poor|strong weak|thick thin|high low
heavy light|long short|clean dirty|near far|sharp blunt|deep shallow|bright dim|brave cowardly"""
SOUNDS = """cow moo|dog woof|cat meow|duck quack|sheep baa|pig oink|owl hoot|horse neigh|lion roar
frog croak|rooster cock-a-doodle-doo|snake hiss|bee buzz|mouse squeak|donkey hee-haw|crow caw"""
PLURALS = """mouse mice|child children|foot feet|tooth teeth|goose geese|man men|woman women|person people
ox oxen|leaf leaves|knife knives|wolf wolves|cactus cacti|fungus fungi|sheep sheep|fish fish
half halves|life lives|wife wives|louse lice"""
NUMBERS = "zero one two three four five six seven eight nine ten eleven twelve".split()

FILLERS = [
    "There is a lot more to say about this, so let me explain.",
    "This is a fascinating topic with a long and rich history.",
    "It is worth looking at this from several different angles.",
    "Many people find this surprising when they first learn it.",
    "Understanding this helps us appreciate the world around us.",
    "Scientists and scholars have discussed this for a very long time.",
    "In fact, this is one of the most common questions people ask.",
    "To understand it fully, we need to consider the bigger picture.",
]
CLOSERS = [
    "I hope this detailed explanation helps you!", "Let me know if you want to know more!",
    "Feel free to ask me anything else!", "I hope that answers your question!",
    "Isn't that amazing?", "Thanks for such a thoughtful question!",
]  # fmt: skip


def table(text: str, rest_joined: bool = True) -> list[tuple[str, str]]:
    """'a b|c d' -> [(a, b), (c, d)]; with several words, the first part is all but the last."""
    rows = []
    for item in text.replace("\n", "|").split("|"):
        words = item.split()
        if rest_joined and len(words) > 2:
            rows.append((" ".join(words[:-1]), words[-1]))
        else:
            rows.append((words[0], " ".join(words[1:])))
    return rows


def facts() -> dict[str, list[tuple[str, str]]]:
    """Questions and one-sentence answers, by kind."""
    capitals = [(f"What is the capital of {c}?", f"The capital of {c} is {city}.")
                for c, city in table(CAPITALS, rest_joined=False)]  # fmt: skip
    legs = [(f"How many legs does a {a} have?", f"A {a} has {n} legs.") for a, n in table(LEGS)]
    colours = []
    for thing, colour in table(COLOURS):
        subject = thing[0].upper() + thing[1:]
        colours.append((f"What colour is {thing}?", f"{subject} is {colour}."))
    opposites = [(f"What is the opposite of {w}?", f"The opposite of {w} is {o}.")
                 for w, o in table(OPPOSITES)]  # fmt: skip
    sounds = [(f"What sound does a {a} make?", f"A {a} says {s}.") for a, s in table(SOUNDS)]
    plurals = [(f"What is the plural of {w}?", f"The plural of {w} is {p}.")
               for w, p in table(PLURALS)]  # fmt: skip
    sums = [(f"What is {NUMBERS[a]} plus {NUMBERS[b]}?", f"{NUMBERS[a].capitalize()} plus "
             f"{NUMBERS[b]} is {NUMBERS[a + b]}.") for a in range(1, 6) for b in range(1, 5)]  # fmt: skip
    return {"capitals": capitals, "legs": legs, "colours": colours, "opposites": opposites,
            "sounds": sounds, "plurals": plurals, "sums": sums}  # fmt: skip


def chatty(rng: random.Random, answer: str) -> str:
    """The same answer, then padding: two or three fillers and a closer. Both answers share
    their first sentence, so they first differ where the preferred one ends."""
    fillers = rng.sample(FILLERS, rng.randint(2, 3))
    return " ".join([answer, *fillers, rng.choice(CLOSERS)])


def row(rng: random.Random, question: str, answer: str) -> dict:
    return {
        "prompt": [{"role": "user", "content": question}],
        "chosen": [{"role": "assistant", "content": answer}],
        "rejected": [{"role": "assistant", "content": chatty(rng, answer)}],
    }


def main() -> None:
    rng = random.Random(3)
    kinds = facts()
    unseen = ("sounds", "plurals")  # kinds of question that only the held-out split asks
    train, heldout = [], []
    for kind, items in kinds.items():
        items = list(items)
        rng.shuffle(items)
        if kind in unseen:
            heldout += items[:5]
            continue
        cut = max(2, len(items) // 6)
        heldout += items[:cut]
        train += items[cut:]
    rng.shuffle(train)
    rng.shuffle(heldout)
    here = Path(__file__).parent
    for name, items in (("preference_train.jsonl", train), ("preference_heldout.jsonl", heldout)):
        rows = [row(rng, question, answer) for question, answer in items]
        (here / name).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        print(f"{name}: {len(rows)} pairs")


if __name__ == "__main__":
    main()
