"""The vocabulary of the synthetic CZSL world: attributes, objects, their families, feasibility.

Attributes come in three families (colour, pattern, state) and objects in four (geometric,
organic, artifact, fabric). Which attribute family applies to which object family is fixed
here, so some compositions are *infeasible* (a checkered apple, a broken shirt never occur) and
open-world feasibility is a meaningful question on this world. How each attribute *looks*
depends on the object family (see ``render.py``): that is the primitive diversity the
prototype-based methods target.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

# Bump when anything that changes generated pixels, splits or text changes: it enters the cache key.
GENERATOR_VERSION = "1.0.0"
# Bump when anything that changes the web corpus (captions or images) changes; it keys the corpus
# cache and is recorded with the pretrained backbone. Benchmark images and splits do not depend on it.
WEB_CORPUS_VERSION = "2"

ATTRIBUTE_FAMILIES: dict[str, tuple[str, ...]] = {
    "colour": ("red", "green", "blue", "yellow", "purple", "orange"),
    "pattern": ("striped", "dotted", "checkered", "zigzag"),
    "state": ("wet", "old", "broken", "frozen", "burnt"),
}

OBJECT_FAMILIES: dict[str, tuple[str, ...]] = {
    "geometric": ("circle", "square", "triangle", "hexagon", "star"),
    "organic": ("apple", "leaf", "mushroom", "fish"),
    "artifact": ("cup", "bottle", "key"),
    "fabric": ("flag", "shirt"),
}

# attribute -> object families it can apply to. Colours apply to everything; patterns are
# printed on made things only; each state has its own physically plausible range.
APPLIES_TO: dict[str, tuple[str, ...]] = {
    **{a: ("geometric", "organic", "artifact", "fabric") for a in ATTRIBUTE_FAMILIES["colour"]},
    **{a: ("geometric", "artifact", "fabric") for a in ATTRIBUTE_FAMILIES["pattern"]},
    "wet": ("geometric", "organic", "artifact", "fabric"),
    "old": ("geometric", "organic", "artifact", "fabric"),
    "broken": ("geometric", "artifact"),
    "frozen": ("geometric", "organic", "artifact"),
    "burnt": ("organic", "artifact", "fabric"),
}

# Synonyms used by the noisy web captions (the canonical name is always among the choices).
ATTRIBUTE_SYNONYMS: dict[str, tuple[str, ...]] = {
    "red": ("red", "crimson", "scarlet"),
    "green": ("green", "emerald", "lime"),
    "blue": ("blue", "navy", "azure"),
    "yellow": ("yellow", "golden", "lemon"),
    "purple": ("purple", "violet", "lilac"),
    "orange": ("orange", "tangerine", "amber"),
    "striped": ("striped", "stripy", "lined"),
    "dotted": ("dotted", "spotted", "polka-dot"),
    "checkered": ("checkered", "chequered", "plaid"),
    "zigzag": ("zigzag", "chevron", "jagged-pattern"),
    "wet": ("wet", "soaked", "damp"),
    "old": ("old", "aged", "worn"),
    "broken": ("broken", "cracked", "shattered"),
    "frozen": ("frozen", "icy", "frosted"),
    "burnt": ("burnt", "charred", "scorched"),
}

# The vocabulary gap. Real CZSL label names are often words that web captions rarely use for what
# the images show (UT-Zappos "Synthetic", "Faux.Leather", "Boots.Ankle"; MIT-States "ruffled"),
# which is why prompt and vocabulary tuning (CoOp, CSP) gain so much over zero-shot CLIP there.
# The world reproduces that: for these primitives the web corpus says a synonym almost always and
# the benchmark's label word only rarely (``text.P_CANONICAL_RARE``), so zero-shot CLIP reads them
# poorly while a method that learns the vocabulary from the training images can fix them.
WEB_RARE_WORDS: frozenset[str] = frozenset({
    "purple", "orange", "zigzag", "burnt",  # attributes: 2 colours, 1 pattern, 1 state
    "hexagon", "mushroom", "bottle", "flag",  # objects: one per family
})

OBJECT_SYNONYMS: dict[str, tuple[str, ...]] = {
    "circle": ("circle", "disc", "round shape"),
    "square": ("square", "box shape", "rectangle"),
    "triangle": ("triangle", "three-sided shape", "wedge"),
    "hexagon": ("hexagon", "six-sided shape", "hex tile"),
    "star": ("star", "star shape", "pentagram"),
    "apple": ("apple", "fruit", "pippin"),
    "leaf": ("leaf", "foliage", "leaflet"),
    "mushroom": ("mushroom", "toadstool", "fungus"),
    "fish": ("fish", "minnow", "trout"),
    "cup": ("cup", "mug", "teacup"),
    "bottle": ("bottle", "flask", "jar"),
    "key": ("key", "door key", "latchkey"),
    "flag": ("flag", "banner", "pennant"),
    "shirt": ("shirt", "t-shirt", "tee"),
}


@dataclass(frozen=True)
class World:
    """The fixed vocabulary and feasibility of the synthetic world (no randomness here)."""

    attribute_families: dict[str, tuple[str, ...]]
    object_families: dict[str, tuple[str, ...]]
    applies_to: dict[str, tuple[str, ...]]

    @cached_property
    def attrs(self) -> list[str]:
        """Attribute names, sorted (the loader's order)."""
        return sorted(a for names in self.attribute_families.values() for a in names)

    @cached_property
    def objs(self) -> list[str]:
        """Object names, sorted (the loader's order)."""
        return sorted(o for names in self.object_families.values() for o in names)

    @cached_property
    def attr_family(self) -> dict[str, str]:
        return {a: fam for fam, names in self.attribute_families.items() for a in names}

    @cached_property
    def obj_family(self) -> dict[str, str]:
        return {o: fam for fam, names in self.object_families.items() for o in names}

    def is_feasible(self, attr: str, obj: str) -> bool:
        """Whether ``attr obj`` can occur in this world."""
        return self.obj_family[obj] in self.applies_to[attr]

    @cached_property
    def feasible_pairs(self) -> list[tuple[str, str]]:
        """All feasible (attr, obj) pairs, sorted."""
        return [(a, o) for a in self.attrs for o in self.objs if self.is_feasible(a, o)]

    def feasibility_matrix(self) -> list[list[int]]:
        """``[len(attrs)][len(objs)]`` 0/1 matrix, rows attr-major in sorted order."""
        return [[int(self.is_feasible(a, o)) for o in self.objs] for a in self.attrs]

    def to_json(self) -> dict:
        return {
            "attribute_families": {k: list(v) for k, v in self.attribute_families.items()},
            "object_families": {k: list(v) for k, v in self.object_families.items()},
            "applies_to": {k: list(v) for k, v in self.applies_to.items()},
            "attrs": self.attrs,
            "objs": self.objs,
            "feasibility": self.feasibility_matrix(),
            "feasible_pairs": [f"{a} {o}" for a, o in self.feasible_pairs],
        }


DEFAULT_WORLD = World(ATTRIBUTE_FAMILIES, OBJECT_FAMILIES, APPLIES_TO)
