"""Builds the harder held-out split of the demo task (heldout_hard.jsonl): python build_hard.py

The same skill as the demo data (build.py): read a sentence about a person and answer
with the fixed record "Surname, First | age | job | city". The rows differ from
everything in train.jsonl twice over:

- the people, surnames and cities are the held-out ones of build.py (never trained on);
- every sentence uses a wording that no training row uses, with the fields in another
  order (age or city first, the name last, labelled fields, …).

So a model scores here only if it learned to pick the fields out of the sentence, not
the five phrasings it was trained on:

    user:      Age 41, lives in Tartu, works as an architect: Ravi Cruz.
    assistant: Cruz, Ravi | 41 | architect | Tartu
"""

import json
import random
from pathlib import Path

from build import CITY, FIRST, JOB, LAST

PHRASES = [
    "Age {age}, lives in {city}, works as {a_job}: {first} {last}.",
    "{city} is home to {first} {last} ({age}), who earns a living as {a_job}.",
    "Occupation: {job}. Town: {city}. Age: {age}. Name: {first} {last}.",
    "A {age}-year-old {job} from {city} introduced themselves as {first} {last}.",
    "{first} {last} ({job}, {city}) turned {age} this year.",
    "Working as {a_job} in {city} at {age}: that is {first} {last}.",
]


def main() -> None:
    rng = random.Random(11)
    held = lambda names: names[len(names) * 3 // 4 :]  # noqa: E731  (build.py's held-out quarter)
    first, last, city = held(FIRST), held(LAST), held(CITY)
    rows = []
    for i in range(40):
        person = dict(first=rng.choice(first), last=rng.choice(last), city=rng.choice(city),
                      job=rng.choice(JOB), age=rng.randint(19, 78))  # fmt: skip
        person["a_job"] = ("an " if person["job"][0] in "aeiou" else "a ") + person["job"]
        question = PHRASES[i % len(PHRASES)].format(**person)
        answer = "{last}, {first} | {age} | {job} | {city}".format(**person)
        rows.append({"messages": [{"role": "user", "content": question},
                                  {"role": "assistant", "content": answer}]})  # fmt: skip
    text = "".join(json.dumps(r) + "\n" for r in rows)
    (Path(__file__).parent / "heldout_hard.jsonl").write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
