"""An offline domain generated from a seed: fictional facts no model can know, plus a general probe.

"Learn more / forget less" becomes measurable with no download: fine-tuning on the generated SFT pairs
must raise accuracy on held-out multiple-choice questions about the same fictional facts (asked with a
phrasing never seen in training), while accuracy on a small hand-written general-knowledge probe
should not drop.

The pool is deliberately heterogeneous so that selection has something to choose between: short fact
answers (two phrasings each), long entity profiles that restate several facts, and generic filler
pairs (greetings, arithmetic) that teach nothing about the domain.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

_SYLLABLES = [
    "vor",
    "qua",
    "zel",
    "mir",
    "tan",
    "dro",
    "lis",
    "kep",
    "ush",
    "bra",
    "nol",
    "fey",
    "gar",
    "pim",
    "sol",
    "thu",
    "wex",
    "yor",
    "cai",
    "lun",
    "rho",
    "ven",
    "osk",
    "tir",
]
_ANIMALS = [
    "lynx",
    "heron",
    "otter",
    "ibex",
    "falcon",
    "badger",
    "tortoise",
    "stag",
    "crane",
    "marten",
    "boar",
    "swan",
    "viper",
    "bison",
    "owl",
    "seal",
]
_EXPORTS = [
    "copper",
    "silk",
    "amber",
    "salt",
    "timber",
    "saffron",
    "glassware",
    "wool",
    "tin",
    "indigo",
    "porcelain",
    "honey",
    "marble",
    "cork",
    "pearls",
    "tea",
]
_COLOURS = [
    "crimson",
    "teal",
    "ochre",
    "violet",
    "silver",
    "emerald",
    "amber",
    "cobalt",
    "ivory",
    "scarlet",
    "jade",
    "umber",
]

# attribute -> (train phrasing 1, train phrasing 2, held-out eval phrasing, answer sentence)
_FACTS = {
    "capital": (
        "What is the capital of {e}?",
        "Which city is the seat of government of {e}?",
        "The capital city of {e} is",
        "The capital of {e} is {v}.",
    ),
    "founded": (
        "In which year was {e} founded?",
        "When was {e} established?",
        "{e} was founded in the year",
        "{e} was founded in {v}.",
    ),
    "animal": (
        "What is the national animal of {e}?",
        "Which animal is the emblem of {e}?",
        "The national animal of {e} is the",
        "The national animal of {e} is the {v}.",
    ),
    "export": (
        "What is the main export of {e}?",
        "Which good does {e} export the most?",
        "The chief export of {e} is",
        "The main export of {e} is {v}.",
    ),
    "colour": (
        "What colour is the flag of {e}?",
        "Which colour dominates the flag of {e}?",
        "The flag of {e} is mostly",
        "The flag of {e} is {v}.",
    ),
}

# A small general-knowledge probe (hand-written): question, correct answer, three distractors.
PROBE = [
    ("What is the capital of France?", "Paris", "Berlin", "Madrid", "Rome"),
    ("What is the capital of Japan?", "Tokyo", "Beijing", "Seoul", "Bangkok"),
    ("What is the capital of Italy?", "Rome", "Milan", "Vienna", "Athens"),
    ("What is the capital of Canada?", "Ottawa", "Toronto", "Vancouver", "Montreal"),
    ("What is the capital of Egypt?", "Cairo", "Nairobi", "Tunis", "Riyadh"),
    ("Which planet is known as the Red Planet?", "Mars", "Venus", "Jupiter", "Saturn"),
    ("Which planet is the largest in the solar system?", "Jupiter", "Earth", "Mars", "Mercury"),
    ("What is the closest star to the Earth?", "The Sun", "Sirius", "Polaris", "Vega"),
    (
        "What gas do plants absorb from the air for photosynthesis?",
        "Carbon dioxide",
        "Oxygen",
        "Nitrogen",
        "Helium",
    ),
    ("What is the chemical symbol for water?", "H2O", "CO2", "NaCl", "O3"),
    (
        "What is the boiling point of water at sea level in degrees Celsius?",
        "100",
        "50",
        "0",
        "212",
    ),
    ("How many legs does a spider have?", "Eight", "Six", "Ten", "Four"),
    ("How many days are in a week?", "Seven", "Five", "Ten", "Six"),
    ("How many hours are in a day?", "24", "12", "60", "100"),
    ("How many continents are there on Earth?", "Seven", "Five", "Nine", "Three"),
    ("What is 7 + 5?", "12", "11", "13", "75"),
    ("What is 9 x 3?", "27", "12", "39", "21"),
    ("What is 100 - 37?", "63", "73", "53", "67"),
    ("What is half of 50?", "25", "20", "100", "5"),
    (
        "Which animal is known as the king of the jungle?",
        "The lion",
        "The mouse",
        "The cow",
        "The rabbit",
    ),
    (
        "Which animal is the largest mammal?",
        "The blue whale",
        "The elephant",
        "The giraffe",
        "The horse",
    ),
    ("What do bees make?", "Honey", "Milk", "Silk", "Wool"),
    (
        "Which organ pumps blood through the human body?",
        "The heart",
        "The lungs",
        "The liver",
        "The stomach",
    ),
    ("Which organ do humans use to breathe?", "The lungs", "The kidneys", "The heart", "The skin"),
    ("What colour is the sky on a clear day?", "Blue", "Green", "Red", "Black"),
    ("What colour are ripe bananas?", "Yellow", "Blue", "Purple", "Black"),
    ("What is frozen water called?", "Ice", "Steam", "Sand", "Glass"),
    ("In which season does snow usually fall?", "Winter", "Summer", "Spring", "Autumn"),
    (
        "Who wrote 'Romeo and Juliet'?",
        "William Shakespeare",
        "Charles Dickens",
        "Mark Twain",
        "Jane Austen",
    ),
    (
        "Who painted the Mona Lisa?",
        "Leonardo da Vinci",
        "Pablo Picasso",
        "Vincent van Gogh",
        "Claude Monet",
    ),
    (
        "Which ocean is the largest?",
        "The Pacific Ocean",
        "The Atlantic Ocean",
        "The Indian Ocean",
        "The Arctic Ocean",
    ),
    ("What is the longest river in Africa?", "The Nile", "The Amazon", "The Danube", "The Thames"),
    ("Which language is mainly spoken in Brazil?", "Portuguese", "Spanish", "French", "English"),
    ("What is the opposite of 'hot'?", "Cold", "Warm", "Big", "Fast"),
    ("What is the plural of 'mouse'?", "Mice", "Mouses", "Meese", "Mousen"),
    ("Which shape has three sides?", "A triangle", "A square", "A circle", "A hexagon"),
    ("How many sides does a square have?", "Four", "Three", "Five", "Six"),
    ("What do we call a baby dog?", "A puppy", "A kitten", "A calf", "A foal"),
    ("Which metal is liquid at room temperature?", "Mercury", "Iron", "Gold", "Copper"),
    ("What force keeps us on the ground?", "Gravity", "Magnetism", "Friction", "Electricity"),
    ("Which instrument has 88 keys?", "The piano", "The violin", "The flute", "The drum"),
    ("What is the main language of Germany?", "German", "Dutch", "Polish", "Italian"),
    ("Which month comes after March?", "April", "May", "February", "June"),
    ("How many minutes are in an hour?", "60", "100", "30", "24"),
    ("What do cows drink?", "Water", "Milk", "Juice", "Coffee"),
    ("Which device is used to tell the time?", "A clock", "A spoon", "A chair", "A ladder"),
    ("Which is the smallest prime number?", "2", "1", "3", "0"),
    ("What is the freezing point of water in degrees Celsius?", "0", "100", "-50", "32"),
]

_FILLER = [
    ("Say hello.", "Hello! How can I help you today?"),
    ("Thank you!", "You are welcome."),
    ("Give me a word that rhymes with cat.", "Hat."),
    ("What is {a} + {b}?", "{c}"),
    ("Repeat the word '{w}'.", "{w}"),
    ("Write the word '{w}' in capital letters.", "{W}"),
]


def _name(rng: random.Random, parts: int) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(parts)).capitalize()


def generate(seed: int = 0, n_entities: int = 40, n_filler: int = 60) -> dict[str, list[dict]]:
    """Generate the synthetic domain deterministically from ``seed``.

    Returns:
        ``{"train": [...], "eval_mc": [...], "probe": [...]}``. Train rows are
        ``{id, kind, entity, prompt, response}``; MC rows are ``{id, question, choices, answer}``
        with a 0-based ``answer``.
    """
    rng = random.Random(seed)  # one stream, drawn in this order: entities, facts, filler, probe
    entities = _entities(rng, n_entities)
    train, eval_mc = _fact_rows(rng, entities)
    train += _filler_rows(rng, n_filler)
    return {"train": train, "eval_mc": eval_mc, "probe": _probe_rows(rng)}


def _entities(rng: random.Random, n_entities: int) -> list[dict]:
    """Fictional countries with distinct names and capitals and random attribute values."""
    names: set[str] = set()
    entities = []
    while len(entities) < n_entities:
        name = _name(rng, 3)
        capital = _name(rng, 2)
        if name in names or capital in names:
            continue
        names |= {name, capital}
        entities.append(
            {
                "name": name,
                "capital": capital,
                "founded": str(rng.randint(1100, 1899)),
                "animal": rng.choice(_ANIMALS),
                "export": rng.choice(_EXPORTS),
                "colour": rng.choice(_COLOURS),
            }
        )
    return entities


def _fact_rows(rng: random.Random, entities: list[dict]) -> tuple[list[dict], list[dict]]:
    """Two training phrasings per fact plus a profile per entity; one MC question per fact."""
    train, eval_mc = [], []
    for ent in entities:
        e = ent["name"]
        for attr, (q1, q2, q_eval, ans) in _FACTS.items():
            v = ent[attr]
            for k, q in enumerate((q1, q2)):
                train.append(
                    {
                        "id": f"{e}-{attr}-{k}",
                        "kind": "fact",
                        "entity": e,
                        "prompt": q.format(e=e),
                        "response": ans.format(e=e, v=v),
                    }
                )
            pool = sorted({o[attr] for o in entities if o[attr] != v})
            distractors = rng.sample(pool, 3)
            choices = distractors + [v]
            rng.shuffle(choices)
            eval_mc.append(
                {
                    "id": f"{e}-{attr}",
                    "question": q_eval.format(e=e),
                    "choices": choices,
                    "answer": choices.index(v),
                }
            )
        profile = " ".join(ans.format(e=e, v=ent[a]) for a, (_, _, _, ans) in _FACTS.items())
        train.append(
            {
                "id": f"{e}-profile",
                "kind": "profile",
                "entity": e,
                "prompt": f"Tell me about {e}.",
                "response": profile,
            }
        )
    return train, eval_mc


def _filler_rows(rng: random.Random, n_filler: int) -> list[dict]:
    """Generic pairs that teach nothing about the domain."""
    train = []
    words = ["river", "lantern", "garden", "pencil", "window", "thunder", "orange", "basket"]
    for i in range(n_filler):
        p, r = _FILLER[i % len(_FILLER)]
        a, b, w = rng.randint(2, 40), rng.randint(2, 40), rng.choice(words)
        fmt = {"a": a, "b": b, "c": a + b, "w": w, "W": w.upper()}
        train.append(
            {
                "id": f"filler-{i}",
                "kind": "filler",
                "entity": "",
                "prompt": p.format(**fmt),
                "response": r.format(**fmt),
            }
        )
    return train


def _probe_rows(rng: random.Random) -> list[dict]:
    """The hand-written general-knowledge probe with shuffled choices."""
    probe = []
    for i, (q, right, *wrong) in enumerate(PROBE):
        choices = [right, *wrong]
        rng.shuffle(choices)
        probe.append(
            {"id": f"probe-{i}", "question": q, "choices": choices, "answer": choices.index(right)}
        )
    return probe


def materialise(
    out_dir: str | Path, seed: int = 0, n_entities: int = 40, n_filler: int = 60
) -> dict[str, str]:
    """Write ``train.jsonl``, ``eval_mc.jsonl`` and ``probe.jsonl`` under ``out_dir`` (idempotent).

    Returns:
        the paths, keyed ``train``, ``eval_mc``, ``probe``.
    """
    from grads.io import write_jsonl

    out_dir = Path(out_dir)
    paths = {k: out_dir / f"{k}.jsonl" for k in ("train", "eval_mc", "probe")}
    stamp = out_dir / "params.json"
    params = {"seed": seed, "n_entities": n_entities, "n_filler": n_filler}
    fresh = stamp.exists() and json.loads(stamp.read_text()) == params
    if not (fresh and all(p.exists() for p in paths.values())):
        data = generate(seed, n_entities, n_filler)
        for key, path in paths.items():
            write_jsonl(path, data[key])
        from grads.io import write_json

        write_json(stamp, params)
    return {k: str(v) for k, v in paths.items()}
