"""Template sentences for the text retention study: three classification tasks and held-out paraphrase pairs.

No installed package ships labelled text that can be read offline (scikit-learn bundles only numeric tables; its
text sets are downloaders), so the sentences are generated from templates with varied vocabulary. The tasks and the
paraphrase set draw on disjoint content words, so the paraphrase set measures knowledge no task trains on.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class TextTask:
    """A classification task the model solves by matching each sentence to the closest label description.

    Attributes:
        name: the task's name.
        labels: one description per class, which the model encodes like a sentence (as CLIP encodes captions).
        train / test: (sentence, class index) pairs.
    """

    name: str
    labels: tuple[str, ...]
    train: tuple[tuple[str, int], ...]
    test: tuple[tuple[str, int], ...]


# ---- task 1: sentiment of reviews, with negations and hedges

_REVIEWED = [
    "the soup",
    "the hotel room",
    "this film",
    "the concert",
    "the service",
    "the pasta",
    "this novel",
    "the staff",
    "the museum tour",
    "this album",
    "the dessert",
    "the flight",
    "the guided hike",
    "the play",
]
_GOOD = ["delicious", "wonderful", "excellent", "charming", "superb", "delightful", "great", "lovely", "pleasant"]
_BAD = ["awful", "terrible", "boring", "disappointing", "dreadful", "bland", "rude", "dull", "mediocre"]
_SENTIMENT = [
    ("{x} was {good}.", 0),
    ("{x} was {bad}.", 1),
    ("{x} was not {bad} at all.", 0),
    ("{x} was not {good} at all.", 1),
    ("honestly, {x} was far from {bad}.", 0),
    ("honestly, {x} was far from {good}.", 1),
    ("I expected {x} to be {bad}, but it was {good}.", 0),
    ("I expected {x} to be {good}, but it was {bad}.", 1),
    ("nobody could call {x} {bad}.", 0),
    ("nobody could call {x} {good}.", 1),
    ("{x}? never {bad}, always {good}.", 0),
    ("{x}? hardly {good}, mostly {bad}.", 1),
]

# ---- task 2: when it happens (past, present, future)

_ACTORS = ["my sister", "our team", "the old man", "a young girl", "the neighbours", "her uncle", "the class", "we"]
_ACTS = [
    ("walked to the park", "walk to the park", "is walking to the park"),
    ("baked some bread", "bake some bread", "is baking some bread"),
    ("wrote a letter", "write a letter", "is writing a letter"),
    ("planted tomatoes", "plant tomatoes", "is planting tomatoes"),
    ("sang a song", "sing a song", "is singing a song"),
    ("swam in the lake", "swim in the lake", "is swimming in the lake"),
    ("visited grandma", "visit grandma", "is visiting grandma"),
    ("learned to dance", "learn to dance", "is learning to dance"),
    ("fed the cat", "feed the cat", "is feeding the cat"),
    ("read the newspaper", "read the newspaper", "is reading the newspaper"),
]
_TENSE = [
    ("yesterday {a} {past}.", 0),
    ("last week {a} {past}.", 0),
    ("{a} already {past} two days ago.", 0),
    ("a long time ago {a} {past}.", 0),
    ("right now {a} {now}.", 1),
    ("at this very moment {a} {now}.", 1),
    ("look, {a} {now} as we speak.", 1),
    ("today, as usual, {a} {now}.", 1),
    ("tomorrow {a} will {future}.", 2),
    ("next month {a} is going to {future}.", 2),
    ("soon {a} will {future}.", 2),
    ("in a few years {a} plans to {future}.", 2),
]

# ---- task 3: what the speaker does (asks, requests, states)

_TOPICS = [
    "the train schedule",
    "the library hours",
    "the recipe",
    "the meeting room",
    "the spare keys",
    "the homework",
    "the garden hose",
    "the weekend plans",
    "the ticket prices",
    "the printer",
    "the parking permit",
    "the wifi password",
    "the invoice",
    "the lunch order",
    "the school bus",
    "the broken lamp",
    "the lecture notes",
    "the rent",
    "the tax form",
    "the birthday cake",
]
_SPEECH = [
    ("where can I find {t}?", 0),
    ("do you know anything about {t}?", 0),
    ("has anyone seen {t}?", 0),
    ("what happened to {t}?", 0),
    ("is {t} ready yet?", 0),
    ("who is in charge of {t}?", 0),
    ("please bring me {t}.", 1),
    ("could you check {t} for me, please.", 1),
    ("send me {t} right away.", 1),
    ("would you mind sorting out {t}.", 1),
    ("take care of {t} before noon.", 1),
    ("kindly forward {t} to me.", 1),
    ("{t} is on the second shelf.", 2),
    ("I already sorted out {t}.", 2),
    ("{t} changed last monday.", 2),
    ("everyone knows about {t} by now.", 2),
    ("{t} was handled by my colleague.", 2),
    ("{t} looks fine to me.", 2),
]

# ---- held-out: paraphrase pairs (two wordings of one event)

_SUBJECTS = [
    ("the doctor", "the physician"),
    ("the child", "the kid"),
    ("the teacher", "the instructor"),
    ("the lawyer", "the attorney"),
    ("the chef", "the cook"),
    ("the student", "the pupil"),
    ("the pilot", "the aviator"),
    ("the police officer", "the cop"),
    ("the farmer", "the grower"),
    ("the sailor", "the seaman"),
]
_VERBS = [
    ("bought", "purchased"),
    ("fixed", "repaired"),
    ("lost", "misplaced"),
    ("found", "came across"),
    ("cleaned", "washed"),
    ("hid", "concealed"),
    ("carried", "transported"),
    ("examined", "inspected"),
    ("sold", "got rid of"),
    ("stole", "took"),
]
_OBJECTS = [
    ("a car", "an automobile"),
    ("a sofa", "a couch"),
    ("a present", "a gift"),
    ("a bicycle", "a bike"),
    ("a jacket", "a coat"),
    ("a phone", "a mobile"),
    ("a ship", "a vessel"),
    ("a stone", "a rock"),
    ("a bag", "a sack"),
    ("a big dog", "a large hound"),
]
_PLACES = [
    ("in the city", "in town"),
    ("near the river", "by the stream"),
    ("at the market", "at the bazaar"),
    ("at the station", "at the depot"),
    ("in the forest", "in the woods"),
    ("at the shore", "at the beach"),
]


def _draw(templates, fill, per_class: int, num_classes: int, rng: random.Random) -> list[tuple[str, int]]:
    """`per_class` distinct sentences per class: a random template of the class, filled by `fill(rng)`."""
    by_class = {c: [t for t, label in templates if label == c] for c in range(num_classes)}
    out: list[tuple[str, int]] = []
    for c in range(num_classes):
        seen: set[str] = set()
        for _ in range(100 * per_class):
            if len(seen) == per_class:
                break
            sentence = rng.choice(by_class[c]).format(**fill(rng))
            if sentence not in seen:
                seen.add(sentence)
                out.append((sentence, c))
        else:
            raise ValueError(f"the templates of class {c} give fewer than {per_class} distinct sentences")
    return out


def _split(pairs: list[tuple[str, int]], test_per_class: int, rng: random.Random) -> tuple[tuple, tuple]:
    rng.shuffle(pairs)
    test, train, counts = [], [], {}
    for sentence, label in pairs:
        target = test if counts.get(label, 0) < test_per_class else train
        counts[label] = counts.get(label, 0) + (target is test)
        target.append((sentence, label))
    return tuple(train), tuple(test)


def make_tasks(seed: int = 0, train_per_class: int = 24, test_per_class: int = 12) -> list[TextTask]:
    """The three tasks in sequence order: sentiment, tense, speech act; sentences drawn with `seed`."""
    rng = random.Random(seed)
    per_class = train_per_class + test_per_class
    specs = [
        (
            "sentiment",
            ("a positive opinion", "a negative opinion"),
            _SENTIMENT,
            lambda r: {"x": r.choice(_REVIEWED), "good": r.choice(_GOOD), "bad": r.choice(_BAD)},
        ),
        (
            "tense",
            ("something that already happened", "something happening now", "something that will happen"),
            _TENSE,
            lambda r: dict(zip(("past", "future", "now"), r.choice(_ACTS)), a=r.choice(_ACTORS)),
        ),
        ("speech_act", ("a question", "a request", "a statement"), _SPEECH, lambda r: {"t": r.choice(_TOPICS)}),
    ]
    tasks = []
    for name, labels, templates, fill in specs:
        pairs = _draw(templates, fill, per_class, len(labels), rng)
        train, test = _split(pairs, test_per_class, rng)
        tasks.append(TextTask(name, labels, train, test))
    return tasks


def _event(rng: random.Random) -> tuple[int, int, int, int]:
    return (
        rng.randrange(len(_SUBJECTS)),
        rng.randrange(len(_VERBS)),
        rng.randrange(len(_OBJECTS)),
        rng.randrange(len(_PLACES)),
    )


def _wordings(event: tuple[int, int, int, int]) -> tuple[str, str]:
    s, v, o, p = (_SUBJECTS[event[0]], _VERBS[event[1]], _OBJECTS[event[2]], _PLACES[event[3]])
    return f"{s[0]} {v[0]} {o[0]} {p[0]}.", f"{p[1]}, {s[1]} {v[1]} {o[1]}."


def paraphrase_set(seed: int = 0, num_pairs: int = 80, near_misses: int = 3) -> tuple[list[str], list[str]]:
    """(queries, candidates): query i's paraphrase is candidate i (other words, other order); after the
    `num_pairs` paraphrases come `near_misses` per query, worded like the paraphrases but with one of subject, verb,
    object or place changed, so that retrieval needs the meaning of every slot."""
    rng = random.Random(10_000 + seed)
    events: list[tuple[int, int, int, int]] = []
    seen: set = set()
    while len(events) < num_pairs:
        event = _event(rng)
        if event not in seen:
            seen.add(event)
            events.append(event)
    queries, paraphrases = zip(*(_wordings(e) for e in events))
    sizes = (len(_SUBJECTS), len(_VERBS), len(_OBJECTS), len(_PLACES))
    misses = []
    for event in events:
        for _ in range(near_misses):
            slot = rng.randrange(4)
            changed = list(event)
            changed[slot] = (event[slot] + rng.randrange(1, sizes[slot])) % sizes[slot]
            misses.append(_wordings(tuple(changed))[1])
    return list(queries), list(paraphrases) + misses
