"""A synthetic long-tail facts corpus: the test bed for "memories store long-tail facts".

Fictional people with a handful of attributes are described by biographies in
varied wording. How many documents mention a person follows a Zipf law, so a
few people are common knowledge and most are rare. Probes ask each person's
attributes as multiple choice; grouping probe accuracy by how often the person
was seen (the frequency bucket) shows where a memory helps.

Facts are stated at least once per person in a canonical sentence whose prefix
is the probe's cloze `prompt`, so even a person with one document is learnable;
the other mentions are paraphrases. Standard library + numpy only; the output
bytes depend only on the arguments.
"""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import numpy as np

from hmtrain.util.files import atomic_write, check_output_dir

# ---- frequency buckets: the one place they are defined -----------------------
BUCKETS = ["1", "2-3", "4-7", "8-15", "16+"]


FILES = ("documents.jsonl.gz", "probes.jsonl", "people.json", "synth.json")  # what a corpus directory holds


def frequency_bucket(n: int) -> str:
    """Bucket label for a person who appears in `n` documents."""
    if n < 1:
        raise ValueError(f"frequency must be >= 1, got {n}")
    if n == 1:
        return "1"
    if n <= 3:
        return "2-3"
    if n <= 7:
        return "4-7"
    if n <= 15:
        return "8-15"
    return "16+"


# ---- vocabulary ---------------------------------------------------------------
FIRST = {
    "f": "Maria Amara Elena Sofia Ingrid Priya Leila Nadia Yara Chiara Freya Hana Ines Jana Kaori Lucia Mireille Noor "
    "Olena Paula Rosa Sanne Talia Una Vera Wanda Zora Alma Beatriz Clara Dalia Esme Farah Greta Hedda Ilse Joanna "
    "Katya Lena Mina Nell Orla Petra Quinn Rania Selin Tove Ursula Viola Wren Ximena Yasmin Zaida".split(),
    "m": "Tomas Kofi Arjun Mateo Lars Emil Hugo Idris Jonas Kenji Luca Marek Nikolai Omar Pavel Rafael Samir Teodor "
    "Ulrich Viktor Wim Yusuf Anton Bruno Cyril Dario Elias Felix Goran Henrik Ivo Jakob Karim Leon Milan Niels Oskar "
    "Pedro Quentin Rui Stefan Tariq Umberto Vasco Walter Xavier Yannick Zeno Aurel Bastian".split(),
}
LAST = (
    "Okafor Lindqvist Moreau Tanaka Castellano Novak Haddad Varga Oyelaran Brennan Kowalczyk Ferreira Nakamura "
    "Abernathy Delacroix Ekström Fitzgerald Galloway Halvorsen Iwasaki Jablonski Kaminski Laurent Marchetti "
    "Nieminen Ostrowski Petrakis Quintero Rasmussen Salazar Thorsen Uchida Valdés Whitfield Yilmaz Zielinski "
    "Achterberg Bergström Cardoso Dragomir Esposito Falkenrath Gunnarsson Hargreaves Ivanova Jovanovic Kovacs "
    "Lombardi Mbeki Nordahl Ortega Pellegrini Rautio Szabo Tavares Urquhart Vasquez Weatherby Zapata Aldridge "
    "Blackwood Carvalho Dunmore Everly Fairbanks Grimaldi Holloway Ingersoll Jarvinen Kristiansen Lachance "
    "Montague Northcott Oakenfold Pemberton Ravenscroft Stanhope Thackeray Underhill Vance Winterbourne"
).split()

VALUES = {
    "birth_city": "Lisbon Oslo Nairobi Kyoto Porto Tallinn Valparaiso Marrakesh Ljubljana Hobart Cusco Bergen "
    "Tbilisi Mombasa Krakow Salzburg Dunedin Antwerp Seville Tampere Halifax Winnipeg Bologna Gdansk Lyon "
    "Aarhus Cork Riga Vilnius Zagreb Malaga Basel Leipzig Rotterdam Adelaide Quebec".split(),
    "employer": [c + " " + s for c, s in zip(
        "Veltrix Nordane Quillon Brightmoor Castellan Duskfield Embergate Falconry Glimmerstone Harrowgate Ironvale "
        "Juniper Kestrel Lanternfall Marrowby Northwind Oakhaven Pinecrest Quarrystone Redfern Silverline Thornbury "
        "Umberfield Valewood Whitmore Yarrow Zephyrine Ashcombe Bramblewick Coldharbour".split(),
        "Systems Logistics Foods Energy Textiles Pharma Robotics Shipping Analytics Insurance Mining Media Optics "
        "Motors Software Bank Chemicals Airlines Publishing Ceramics Foundry Telecom Brewing Biotech Capital "
        "Instruments Construction Outfitters Studios Holdings".split())],
    "occupation": "architect baker carpenter chemist dentist electrician engineer florist geologist historian "
    "illustrator journalist librarian mechanic nurse optician pharmacist photographer pilot plumber surgeon "
    "translator veterinarian watchmaker accountant astronomer economist locksmith midwife sculptor".split(),
    "university": [p + " " + s for p, s in zip(
        "Calder Northfield Ashbourne Brightwater Carrow Dunmere Elmsworth Fenwick Glenhaven Hollins Ivory Kingsmere "
        "Larchmont Meadowbrook Norwood Oakridge Penrose Riverton Stonebridge Thornfield Upton Westbrook "
        "Whitlock Yardley".split(),
        ["University", "Institute of Technology", "College", "Polytechnic"] * 6)],
    "instrument": "cello violin piano flute clarinet oboe trumpet harp accordion banjo saxophone trombone viola "
    "mandolin bassoon harpsichord".split(),
    "sport": ["tennis", "football", "basketball", "volleyball", "cricket", "rugby", "golf", "badminton", "squash",
              "baseball", "hockey", "handball", "water polo", "table tennis", "lacrosse"],
}
OPTIONAL = {"instrument": 0.6, "sport": 0.6}  # probability a person has the attribute
PROBED = ["birth_city", "employer", "occupation", "university", "instrument", "sport"]
MONTHS = "January February March April May June July August September October November December".split()

# ---- templates ----------------------------------------------------------------
# {s}: subject (full name, first name or pronoun); {sp}: its possessive;
# {name}/{first}: the person; {p}: possessive pronoun; {v}: the value.
# Template 0 is canonical: with the full name it starts with the probe prompt.
TEMPLATES = {
    "birth_city": ["{s} was born in {v}.", "{s} is a native of {v}.", "{v} is the birthplace of {name}.",
                   "{s} came into the world in {v}.", "The city of {v} is where {name} was born.",
                   "{s} spent {p} early childhood in {v}, the city of {p} birth.",
                   "Born in {v}, {name} never lost {p} fondness for the place."],
    "employer": ["{s} works for {v}.", "{s} is employed by {v}.", "{s} has a job at {v}.", "{v} employs {name}.",
                 "At {v}, {name} is a valued member of staff.", "{s} draws a salary from {v}.",
                 "{s} joined {v} several years ago and still works there."],
    "occupation": ["{s} works as {v}.", "{s} is {v} by profession.", "By trade, {name} is {v}.",
                   "{s} earns a living as {v}.", "{s} has built a career as {v}.", "Professionally, {name} is {v}."],
    "university": ["{s} studied at {v}.", "{s} is a graduate of {v}.", "{s} attended {v}.",
                   "{s} earned a degree from {v}.", "{v} is where {name} went to university.",
                   "{s} holds a diploma from {v}."],
    "instrument": ["{sp} favourite instrument is the {v}.", "{s} loves playing the {v}.",
                   "{s} plays the {v} in {p} free time.", "The {v} is {name}'s favourite instrument.",
                   "{s} has practised the {v} since childhood.", "Of all instruments, {name} likes the {v} best."],
    "sport": ["{sp} favourite sport is {v}.", "{s} is a keen {v} player.", "{s} plays {v} every weekend.",
              "{v} is {name}'s favourite sport.", "In {p} spare time, {name} plays {v}.",
              "{s} has loved {v} since school."],
    # Never "<name> was born in <year>": that would continue the birth_city prompt.
    "birth_date": ["{s} was born on {v}.", "The birth date of {name} is {v}.", "{sp} date of birth is {v}.",
                   "{s} came into this world on {v}.", "On {v}, {name} was born.",
                   "Records give {name}'s birth date as {v}."],
}
PROMPTS = {"birth_city": "{name} was born in", "employer": "{name} works for", "occupation": "{name} works as",
           "university": "{name} studied at", "instrument": "{name}'s favourite instrument is the",
           "sport": "{name}'s favourite sport is"}
QUESTIONS = {"birth_city": "In which city was {name} born?", "employer": "Which company does {name} work for?",
             "occupation": "What does {name} do for a living?", "university": "Which university did {name} attend?",
             "instrument": "Which musical instrument does {name} like best?",
             "sport": "What is {name}'s favourite sport?"}
INTROS = ["This short biography is about {name}.", "Here is what is known about {name}.",
          "The following notes describe the life of {name}.", "Meet {name}.", "A few facts about {name} follow.",
          "{name} is the subject of this profile.", "This entry collects some details on {name}."]
FILLERS = ["Friends describe {first} as {adj}.", "Colleagues say {first} is {adj} and {adj2}.",
           "Neighbours remember {first} as {adj}.", "Little else about {first} appears in the public record.",
           "{P} rarely talks about {p} private life.", "Those who know {first} call {o} {adj}.",
           "{P} keeps a small notebook of ideas.", "Some say {first} is {adj}, others that {pn} is simply {adj2}."]
ADJECTIVES = ("kind patient curious generous quiet cheerful thoughtful stubborn witty modest careful "
              "ambitious calm energetic honest reserved").split()
PRONOUNS = {"f": {"pn": "she", "p": "her", "o": "her"}, "m": {"pn": "he", "p": "his", "o": "him"}}


def _surface(attribute: str, value: str) -> str:
    """How a value reads in text: occupations take an article."""
    if attribute == "occupation":
        return ("an " if value[0] in "aeiou" else "a ") + value
    return value


def _cap(sentence: str) -> str:
    return sentence[0].upper() + sentence[1:]


def _doc_counts(num_people: int, num_documents: int, s: float, minimum: int) -> list[int]:
    """Counts ~ lam / rank^s floored at `minimum`, summing exactly to `num_documents`."""
    w = 1.0 / np.arange(1, num_people + 1, dtype=np.float64) ** s
    lo, hi = 0.0, float(num_documents) / w[-1] + 1.0
    for _ in range(200):  # bisection on the scale: sum(max(min, lam*w)) is monotone in lam
        lam = 0.5 * (lo + hi)
        lo, hi = (lam, hi) if np.maximum(minimum, lam * w).sum() < num_documents else (lo, lam)
    x = np.maximum(minimum, hi * w)
    counts = np.floor(x).astype(np.int64)
    short = num_documents - int(counts.sum())
    if short > 0:  # largest remainder; stable sort keeps ties in rank order
        counts[np.argsort(-(x - counts), kind="stable")[:short]] += 1
    elif short < 0:
        counts[np.argsort(-counts, kind="stable")[: -short]] -= 1
    return [int(c) for c in counts]


def _make_people(rng: np.random.Generator, num_people: int) -> list[dict]:
    names = [(g, first, last) for g in ("f", "m") for first in FIRST[g] for last in LAST]
    people = []
    for i, k in enumerate(rng.choice(len(names), size=num_people, replace=False)):
        gender, first, last = names[int(k)]
        day, month, year = int(rng.integers(1, 29)), MONTHS[int(rng.integers(12))], int(rng.integers(1940, 2001))
        attrs = {"birth_date": f"{day} {month} {year}"}
        for attr in PROBED:
            has = attr not in OPTIONAL or rng.random() < OPTIONAL[attr]
            value = VALUES[attr][int(rng.integers(len(VALUES[attr])))]
            if has:
                attrs[attr] = value
        people.append({"person": i, "name": f"{first} {last}", "first": first, "gender": gender,
                       "attributes": attrs})
    return people


def _sentence(rng: np.random.Generator, person: dict, attribute: str, canonical: bool) -> str:
    pron = PRONOUNS[person["gender"]]
    name, first = person["name"], person["first"]
    if canonical:
        template, subject = TEMPLATES[attribute][0], name
    else:
        template = TEMPLATES[attribute][int(rng.integers(len(TEMPLATES[attribute])))]
        subject = [name, name, first, pron["pn"]][int(rng.integers(4))]
    poss = pron["p"] if subject == pron["pn"] else subject + "'s"
    text = template.format(s=subject, sp=poss, name=name, first=first, p=pron["p"],
                           v=_surface(attribute, person["attributes"][attribute]))
    return _cap(text)


def _document(rng: np.random.Generator, person: dict, home: list[str]) -> str:
    attrs = list(person["attributes"])
    k = min(len(attrs), int(rng.integers(3, 6)))
    extra = [a for a in rng.permutation(attrs).tolist() if a not in home][: max(0, k - len(home))]
    body = [_sentence(rng, person, a, canonical=True) for a in home]
    body += [_sentence(rng, person, a, canonical=False) for a in extra]
    pron = PRONOUNS[person["gender"]]
    for _ in range(int(rng.integers(1, 3))):
        adj, adj2 = rng.choice(ADJECTIVES, size=2, replace=False).tolist()
        filler = FILLERS[int(rng.integers(len(FILLERS)))]
        body.append(_cap(filler.format(first=person["first"], adj=adj, adj2=adj2, P=pron["pn"].capitalize(), **pron)))
    order = rng.permutation(len(body)).tolist()
    intro = INTROS[int(rng.integers(len(INTROS)))].format(name=person["name"])
    return " ".join([intro] + [body[i] for i in order])


def synthesize(
    out_dir: Path,
    *,
    num_people: int = 400,
    num_documents: int = 3000,
    zipf_exponent: float = 1.1,
    min_docs_per_person: int = 1,
    num_choices: int = 8,
    seed: int = 0,
    overwrite: bool = False,
) -> dict:
    """Write documents.jsonl.gz, probes.jsonl, people.json, synth.json to `out_dir`; return the summary.
    A corpus already there is replaced only with `overwrite`."""
    _check_args(num_people, num_documents, zipf_exponent, min_docs_per_person, num_choices)
    out_dir = Path(out_dir)
    check_output_dir(out_dir, "--out")
    existing = [name for name in FILES if (out_dir / name).exists()]
    if existing and not overwrite:
        raise FileExistsError(f"--out {out_dir} already holds a corpus ({', '.join(existing)}); pass --overwrite "
                              "to replace it, or choose another --out")

    rng = np.random.default_rng(seed)
    people = _make_people(rng, num_people)
    counts = _doc_counts(num_people, num_documents, zipf_exponent, min_docs_per_person)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Each file is renamed into place when complete: a failure leaves earlier files as they were.
    doc_ids, num_texts = _write_documents(out_dir / "documents.jsonl.gz", rng, people, counts, num_documents)
    probes = _make_probes(rng, people, counts, doc_ids, num_choices)
    with atomic_write(out_dir / "probes.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(p) + "\n" for p in probes)
    with atomic_write(out_dir / "people.json", "w", encoding="utf-8") as f:
        f.write(json.dumps(people, indent=1) + "\n")

    summary = {
        "params": {"num_people": num_people, "num_documents": num_documents, "zipf_exponent": zipf_exponent,
                   "min_docs_per_person": min_docs_per_person, "num_choices": num_choices, "seed": seed},
        "num_people": num_people, "num_documents": num_texts, "num_probes": len(probes),
        "max_docs_per_person": max(counts), "buckets": BUCKETS,
        "people_per_bucket": {b: sum(p["bucket"] == b for p in people) for b in BUCKETS},
        "documents_per_bucket": {b: sum(p["frequency"] for p in people if p["bucket"] == b) for b in BUCKETS},
        "probes_per_bucket": {b: sum(p["bucket"] == b for p in probes) for b in BUCKETS},
        "attributes": PROBED,
        "files": list(FILES),
    }
    with atomic_write(out_dir / "synth.json", "w", encoding="utf-8") as f:
        f.write(json.dumps(summary, indent=2) + "\n")
    return summary


def _check_args(num_people: int, num_documents: int, zipf_exponent: float, min_docs_per_person: int,
                num_choices: int) -> None:
    """Checked where both the CLI and the demo enter, so the messages name their flags."""
    capacity = sum(len(v) for v in FIRST.values()) * len(LAST)
    if not 1 <= num_people <= capacity:
        raise ValueError(f"--people must be in [1, {capacity}] (unique names available), got {num_people}")
    if min_docs_per_person < 1:
        raise ValueError(f"min_docs_per_person must be >= 1, got {min_docs_per_person}")
    if num_documents < num_people * min_docs_per_person:
        raise ValueError(f"--documents must be at least --people x {min_docs_per_person} document(s) each = "
                         f"{num_people * min_docs_per_person}, got {num_documents}")
    if not (math.isfinite(zipf_exponent) and zipf_exponent >= 0):
        raise ValueError(f"--zipf must be a finite number >= 0, got {zipf_exponent}")
    max_choices = min(len(VALUES[a]) for a in PROBED)
    if not 2 <= num_choices <= max_choices:
        raise ValueError(f"--choices must be in [2, {max_choices}], got {num_choices}")


def _write_documents(path: Path, rng: np.random.Generator, people: list[dict], counts: list[int],
                     num_documents: int) -> tuple[list[list[str]], int]:
    """Every person's documents, interleaved, as gzipped JSON lines; returns each person's doc ids."""
    # Person index = frequency rank (0 is the most documented person).
    texts: list[tuple[int, str]] = []
    for person, n in zip(people, counts):
        attrs = rng.permutation(list(person["attributes"])).tolist()
        # Each attribute gets a "home" document that states it canonically.
        homes = [[a for j, a in enumerate(attrs) if j % n == d] for d in range(n)]
        texts += [(person["person"], _document(rng, person, homes[d])) for d in range(n)]
    order = rng.permutation(len(texts)).tolist()  # interleave people across the file
    width = max(6, len(str(num_documents - 1)))
    doc_ids: list[list[str]] = [[] for _ in people]
    # mtime=0 and no file name in the gzip header: same arguments give the same bytes.
    with atomic_write(path) as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as f:
        for i, k in enumerate(order):
            pid, text = texts[k]
            doc_id = f"doc-{i:0{width}d}"
            doc_ids[pid].append(doc_id)
            f.write((json.dumps({"id": doc_id, "text": text, "person": pid}) + "\n").encode("utf-8"))
    return doc_ids, len(texts)


def _make_probes(rng: np.random.Generator, people: list[dict], counts: list[int], doc_ids: list[list[str]],
                 num_choices: int) -> list[dict]:
    """One multiple-choice question per person and probed attribute; records each person's frequency."""
    probes = []
    for person, n in zip(people, counts):
        person["frequency"], person["bucket"], person["doc_ids"] = n, frequency_bucket(n), doc_ids[person["person"]]
        for attr in PROBED:
            if attr not in person["attributes"]:
                continue
            value = person["attributes"][attr]
            others = [v for v in VALUES[attr] if v != value]
            picks = rng.choice(len(others), size=num_choices - 1, replace=False).tolist()
            choices = [value] + [others[j] for j in picks]
            choices = [" " + _surface(attr, choices[j]) for j in rng.permutation(num_choices).tolist()]
            name = person["name"]
            probes.append({"id": f"probe-{person['person']:05d}-{attr}", "person": person["person"],
                           "attribute": attr, "question": QUESTIONS[attr].format(name=name),
                           "prompt": PROMPTS[attr].format(name=name), "answer": " " + _surface(attr, value),
                           "choices": choices, "frequency": n, "bucket": person["bucket"],
                           "doc_ids": person["doc_ids"]})
    return probes
