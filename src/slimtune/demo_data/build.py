"""Builds the demo data set (train.jsonl, heldout.jsonl): python build.py

The skill: read a sentence about a person and answer with a fixed record,
surname first, fields separated by " | ":

    user:      Meet Lena Hart: a 34-year-old baker from Oslo.
    assistant: Hart, Lena | 34 | baker | Oslo

The sentences come in several phrasings. The held-out rows use first names,
surnames and cities that never occur in the training rows, so a model that gets
them right has learned the format, not memorised answers.
"""

import json
import random
from pathlib import Path

FIRST = """Lena Omar Sara Jonas Mira Tomas Ines Felix Nora Ivan Clara Hugo Maya Leon Alma Pavel Rosa
Emil Vera Oscar Lina Marco Zoe Anton Ida Rafael Elsa Timo Nadia Karl Yara Sven Olga Luis Hanna Milo
Greta Amir Freya Bruno Kira Nils Leila Otto Dora Ravi Edith Jan Aiko Teo""".split()
LAST = """Hart Novak Berg Silva Okafor Lund Moreau Kowal Sato Fischer Rossi Haddad Brandt Costa Varga
Nyberg Duval Petrov Quinn Santos Weber Lindqvist Tanaka Horvat Mendes Keller Nagy Dahl Ortega Jensen
Bauer Russo Ivanova Holm Marin Engel Park Falk Moreno Vogel Laine Barros Stein Kovacs Roth Ahmed
Blom Ferreira Winter Cruz""".split()
CITY = """Oslo Lisbon Vienna Porto Dublin Bergen Lyon Krakow Kyoto Munich Turin Beirut Leipzig Quito
Szeged Malmo Nantes Sofia Galway Recife Zurich Tampere Osaka Split Braga Basel Debrecen Aarhus Seville
Odense Graz Naples Riga Uppsala Bilbao Ghent Busan Linz Madrid Bremen Tartu Santos Bonn Pecs Rome Cairo
Gdansk Lima Bern Cork""".split()
JOB = """baker pilot nurse teacher farmer painter lawyer chemist sailor dentist plumber writer
architect librarian florist butcher engineer pharmacist jeweler carpenter""".split()
PHRASES = [
    "{first} {last} is {age} years old, works as {a_job} and lives in {city}.",
    "Meet {first} {last}: a {age}-year-old {job} from {city}.",
    "{first} {last}, {age}, is {a_job} based in {city}.",
    "In {city} lives {first} {last}, {a_job} aged {age}.",
    "My neighbour {first} {last} is {a_job}; {first} is {age} and grew up in {city}.",
]


def row(rng: random.Random, first: list[str], last: list[str], city: list[str]) -> dict:
    person = dict(
        first=rng.choice(first),
        last=rng.choice(last),
        city=rng.choice(city),
        job=rng.choice(JOB),
        age=rng.randint(19, 78),
    )
    person["a_job"] = ("an " if person["job"][0] in "aeiou" else "a ") + person["job"]
    question = rng.choice(PHRASES).format(**person)
    answer = "{last}, {first} | {age} | {job} | {city}".format(**person)
    return {
        "messages": [
            {"role": "user", "content": question},
            {"role": "assistant", "content": answer},
        ]
    }


def main() -> None:
    rng = random.Random(7)
    split = lambda names: (names[: len(names) * 3 // 4], names[len(names) * 3 // 4 :])  # noqa: E731
    (first_a, first_b), (last_a, last_b), (city_a, city_b) = split(FIRST), split(LAST), split(CITY)
    here = Path(__file__).parent
    for name, count, names in (
        ("train", 160, (first_a, last_a, city_a)),
        ("heldout", 40, (first_b, last_b, city_b)),
    ):
        rows = [row(rng, *names) for _ in range(count)]
        text = "".join(json.dumps(r) + "\n" for r in rows)
        (here / f"{name}.jsonl").write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
