"""Eight English text-classification tasks (and a shared mixture), generated offline.

Every task is balanced and seeded; sentences come from templates and word lists
here, so nothing is downloaded. The tasks are deliberately about different
properties of a sentence (sentiment, topic, negation, mood, tense, grammar,
number, animacy), so that fine-tunes on them pull an encoder different ways.
"""

import random

NOUNS = ["movie", "meal", "hotel", "concert", "book", "game", "trip", "class",
         "show", "service", "phone", "car", "song", "room", "team", "lecture"]
POS = ["wonderful", "great", "excellent", "delightful", "superb", "lovely",
       "fantastic", "pleasant", "brilliant", "charming", "enjoyable", "terrific"]
NEG = ["awful", "terrible", "dreadful", "boring", "horrible", "disappointing",
       "poor", "unpleasant", "mediocre", "annoying", "dull", "miserable"]
TOPICS = {
    "sports": ["the striker", "the referee", "the goalkeeper", "the coach", "the runner",
               "scored a goal", "won the match", "trained at the stadium", "lost the final"],
    "tech": ["the engineer", "the programmer", "the startup", "the laptop", "the server",
             "shipped the update", "fixed the bug", "launched an app", "crashed the database"],
    "food": ["the chef", "the baker", "the waiter", "the kitchen", "the restaurant",
             "cooked the soup", "baked fresh bread", "served dessert", "burned the sauce"],
    "travel": ["the pilot", "the tourist", "the guide", "the airline", "the traveler",
               "booked a flight", "missed the train", "visited the museum", "packed a suitcase"],
}
SUBJ_SG = ["the dog", "the teacher", "the child", "my neighbor", "the doctor", "the bird",
           "the student", "the farmer", "the artist", "the cat"]
SUBJ_PL = ["the dogs", "the teachers", "the children", "my neighbors", "the doctors",
           "the birds", "the students", "the farmers", "the artists", "the cats"]
VERBS = [("walk", "walks", "walked"), ("play", "plays", "played"), ("watch", "watches", "watched"),
         ("cook", "cooks", "cooked"), ("paint", "paints", "painted"), ("call", "calls", "called"),
         ("visit", "visits", "visited"), ("clean", "cleans", "cleaned"), ("help", "helps", "helped"),
         ("open", "opens", "opened")]
OBJECTS = ["the door", "the garden", "a friend", "the kitchen", "the window", "a picture",
           "the park", "the market", "a letter", "the river"]
ANIMALS = ["the horse", "the rabbit", "the wolf", "the parrot", "the dolphin", "the fox",
           "the tiger", "the sheep", "the eagle", "the frog"]
THINGS = ["the table", "the lamp", "the rock", "the bottle", "the bridge", "the clock",
          "the chair", "the bucket", "the ladder", "the mirror"]
WHEN = ["today", "every day", "in the morning", "quietly", "again", "at night", "often", ""]


def _clean(s):
    return " ".join(s.split())


def sentiment(rng, label):
    adj = rng.choice(POS if label else NEG)
    t = rng.choice(["The {n} was {a}.", "I thought the {n} was {a}.", "What a {a} {n}.",
                    "Honestly, the {n} felt {a} {w}.", "Our {n} turned out {a}."])
    return _clean(t.format(n=rng.choice(NOUNS), a=adj, w=rng.choice(WHEN)))


def topic(rng, label):
    words = TOPICS[list(TOPICS)[label]]
    subj = rng.choice([w for w in words if w.startswith("the")])
    act = rng.choice([w for w in words if not w.startswith("the")])
    return _clean(f"{subj.capitalize()} {act} {rng.choice(WHEN)}.")


def negation(rng, label):
    s, v, o = rng.choice(SUBJ_SG), rng.choice(VERBS), rng.choice(OBJECTS)
    if label:
        verb = rng.choice([f"did not {v[0]}", f"never {v[2]}", f"does not {v[0]}"])
    else:
        verb = rng.choice([v[2], v[1], f"always {v[2]}"])
    return _clean(f"{s.capitalize()} {verb} {o} {rng.choice(WHEN)}.")


def question(rng, label):
    s, v, o = rng.choice(SUBJ_SG), rng.choice(VERBS), rng.choice(OBJECTS)
    end = rng.choice(["", "?", "."])
    if label:
        text = rng.choice([f"Did {s} {v[0]} {o}", f"Does {s} {v[0]} {o}", f"Will {s} {v[0]} {o}"])
    else:
        text = rng.choice([f"{s.capitalize()} {v[2]} {o}", f"{s.capitalize()} {v[1]} {o}",
                           f"{s.capitalize()} will {v[0]} {o}"])
    return _clean(f"{text} {rng.choice(WHEN)}{end}")


def tense(rng, label):
    s, v, o = rng.choice(SUBJ_SG + SUBJ_PL), rng.choice(VERBS), rng.choice(OBJECTS)
    if label:
        verb = v[2]
        when = rng.choice(["yesterday", "last week", "", "once"])
    else:
        verb = v[1] if s in SUBJ_SG else v[0]
        when = rng.choice(["every day", "now", "", "often"])
    return _clean(f"{s.capitalize()} {verb} {o} {when}.")


def agreement(rng, label):
    plural = rng.random() < 0.5
    s, v, o = rng.choice(SUBJ_PL if plural else SUBJ_SG), rng.choice(VERBS), rng.choice(OBJECTS)
    right = v[0] if plural else v[1]
    wrong = v[1] if plural else v[0]
    return _clean(f"{s.capitalize()} {right if label else wrong} {o} {rng.choice(WHEN)}.")


def number(rng, label):
    s, v, o = rng.choice(SUBJ_PL if label else SUBJ_SG), rng.choice(VERBS), rng.choice(OBJECTS)
    return _clean(f"{s.capitalize()} {v[2]} {o} {rng.choice(WHEN)}.")


def animacy(rng, label):
    s = rng.choice(ANIMALS if label else THINGS)
    rest = rng.choice(["was near the river", "stood in the yard", "looked old", "was brown",
                       "appeared at dawn", "stayed in the barn", "was very heavy"])
    return _clean(f"{s.capitalize()} {rest} {rng.choice(WHEN)}.")


TASKS = {
    "sentiment": (sentiment, 2),
    "topic": (topic, 4),
    "negation": (negation, 2),
    "question": (question, 2),
    "tense": (tense, 2),
    "agreement": (agreement, 2),
    "number": (number, 2),
    "animacy": (animacy, 2),
}


def shared_mixture(rng, label):
    """The shared fine-tuning data of the correlated regime: all tasks' sentences,
    labelled by a property none of the tasks uses (odd/even word count)."""
    fn, classes = TASKS[rng.choice(list(TASKS))]
    for _ in range(100):
        s = fn(rng, rng.randrange(classes))
        if len(s.split()) % 2 == label:
            return s
    return s


def split(task, n, seed):
    """n balanced (sentence, label) pairs of one task."""
    fn, classes = (shared_mixture, 2) if task == "shared" else TASKS[task]
    rng = random.Random(f"{task}-{seed}")
    data = [(fn(rng, i % classes), i % classes) for i in range(n)]
    rng.shuffle(data)
    return data


def splits(task):
    """train (2000), validation (100) and test (300), disjoint seeds."""
    return split(task, 2000, 0), split(task, 100, 1), split(task, 300, 2)
