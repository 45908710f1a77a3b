"""Language for the synthetic world: per-pair descriptions and noisy web captions.

Descriptions say how the attribute looks *on that object* and are written from the same rules
the renderer follows (``render.py``), so they are true of the images: they serve
language-informed methods (e.g. PLID-style description prompts) and interpretability analyses.
"""

from __future__ import annotations

import numpy as np

from .world import ATTRIBUTE_SYNONYMS, DEFAULT_WORLD, OBJECT_SYNONYMS, WEB_RARE_WORDS, World

# (attribute, object family) -> how it looks. A missing family means the same for all families.
_LOOK: dict[str, dict[str, str]] = {
    "wet": {
        "geometric": "is darkened and bluish with a bright glossy highlight",
        "organic": "is covered in small bright water droplets",
        "artifact": "stands in a blue-grey puddle with water streaks running down it",
        "fabric": "has dark soaked patches and drops falling from it",
    },
    "old": {
        "geometric": "is faded and grey with dark cracks across it",
        "organic": "is shrivelled, yellow-brown and covered in brown spots",
        "artifact": "is dull and speckled with orange rust",
        "fabric": "is faded with a frayed edge and moth holes",
    },
    "broken": {
        "geometric": "is split into two pieces pushed apart",
        "artifact": "has a wedge chipped out and a dark crack",
    },
    "frozen": {
        "geometric": "is pale icy blue with white frost crystals",
        "organic": "has a white frosted rim and rime speckles",
        "artifact": "is bluish with icicles hanging from its underside",
    },
    "burnt": {
        "organic": "is darkened with black charred patches",
        "artifact": "is streaked with black soot with smoke rising above it",
        "fabric": "has blackened edges and burn holes with dark rims",
    },
}
_COLOUR_LOOK = {
    "geometric": "is filled with a flat, saturated {a}",
    "organic": "is a natural, slightly brownish {a} with a rounded highlight",
    "artifact": "is a metallic, slightly greyish {a} with shiny bands",
    "fabric": "is a soft pastel {a} with a fine woven texture",
}
_PATTERN_LOOK = {
    "striped": {"geometric": "has bold parallel stripes", "artifact": "has thin diagonal stripes",
                "fabric": "has wavy stripes"},
    "dotted": {"geometric": "has a few large round dots in a grid", "artifact": "has many small dots",
               "fabric": "has irregular polka dots"},
    "checkered": {"geometric": "has a large checkerboard", "artifact": "has a fine checkerboard",
                  "fabric": "has a diagonal check"},
    "zigzag": {"geometric": "has broad chevrons", "artifact": "has fine zigzag lines",
               "fabric": "has thin zigzag bands"},
}
_OBJECT_LOOK = {
    "circle": "a round disc", "square": "a four-sided block", "triangle": "a three-cornered shape",
    "hexagon": "a six-sided tile", "star": "a five-pointed star",
    "apple": "a round fruit with a stem and a small leaf", "leaf": "a pointed leaf with a midrib and veins",
    "mushroom": "a domed cap on a short stem", "fish": "an oval body with a tail fin and an eye",
    "cup": "a tapered cup with a ring handle", "bottle": "a bottle with a narrow neck and a cap",
    "key": "a key with a ring head and teeth", "flag": "a waving cloth on a pole",
    "shirt": "a T-shaped shirt with sleeves",
}


def describe(attr: str, obj: str, world: World = DEFAULT_WORLD) -> list[str]:
    """Sentences describing how ``attr`` looks on ``obj`` (the pair must be feasible)."""
    if not world.is_feasible(attr, obj):
        raise ValueError(f"'{attr} {obj}' is infeasible in the synthetic world; it has no description")
    fam, afam = world.obj_family[obj], world.attr_family[attr]
    if afam == "colour":
        look = _COLOUR_LOOK[fam].format(a=attr)
    elif afam == "pattern":
        look = _PATTERN_LOOK[attr][fam] + " printed on it"
    else:
        look = _LOOK[attr][fam]
    return [
        f"A {attr} {obj} {look}.",
        f"The {obj}, {_OBJECT_LOOK[obj]}, {look}.",
        f"A photo of a {attr} {obj}: {_OBJECT_LOOK[obj]} that {look}.",
    ]


def descriptions(world: World = DEFAULT_WORLD) -> dict[str, list[str]]:
    """``{"attr obj": [sentences]}`` for every feasible pair."""
    return {f"{a} {o}": describe(a, o, world) for a, o in world.feasible_pairs}


_TEMPLATES = (
    "a photo of {a} {o}", "a photo of a {a} {o}", "{a} {o}", "a {a} {o} on a cluttered background",
    "a picture of the {a} {o}", "a {o} that is {a}", "the {o} looks {a}", "{o}, {a}",
    "a small {a} {o}", "an image showing a {a} {o} and some clutter", "close-up of a {a} {o}",
)
_NO_ATTR_TEMPLATES = ("a photo of a {o}", "a {o}", "picture of the {o}", "a {o} somewhere in the scene")
_DISTRACTORS = ("photo", "image", "nice", "random", "stuff", "background", "scene", "pic", "cool",
                "shapes", "lol", "look", "new", "thing", "today")


# How often a web caption uses a ``WEB_RARE_WORDS`` label word instead of one of its synonyms.
P_CANONICAL_RARE = 0.01


def _web_word(name: str, synonyms: tuple[str, ...], rng: np.random.Generator, p_canonical: float) -> str:
    if name in WEB_RARE_WORDS:
        if rng.random() < P_CANONICAL_RARE:
            return name
        return str(rng.choice([s for s in synonyms if s != name]))
    return name if rng.random() < p_canonical else str(rng.choice(synonyms))


def noisy_caption(attr: str, obj: str, rng: np.random.Generator, p_canonical: float = 0.6,
                  p_drop_attr: float = 0.1, p_distractor: float = 0.3) -> str:
    """A web-style caption of an ``attr obj`` image: synonyms, varied word order, missing
    attribute sometimes, distractor words; label words in ``WEB_RARE_WORDS`` are rarely used."""
    a = _web_word(attr, ATTRIBUTE_SYNONYMS[attr], rng, p_canonical)
    o = _web_word(obj, OBJECT_SYNONYMS[obj], rng, p_canonical)
    if rng.random() < p_drop_attr:
        text = str(rng.choice(_NO_ATTR_TEMPLATES)).format(o=o)
    else:
        text = str(rng.choice(_TEMPLATES)).format(a=a, o=o)
    words = text.split()
    for _ in range(int(rng.random() < p_distractor) + int(rng.random() < p_distractor / 3)):
        words.insert(int(rng.integers(0, len(words) + 1)), str(rng.choice(_DISTRACTORS)))
    return " ".join(words)
