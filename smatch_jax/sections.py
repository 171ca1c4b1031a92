"""Typed config sections.

Each section of an experiment config (`config.loss`, `config.noise`, ...) is a frozen dataclass
owned by the module that uses it (`LossConfig` in objective.py, `NoiseConfig` in noise.py, ...).
Its fields, with their defaults and a comment each, are the schema `smatch_jax.config`
assembles; its `CHOICES` and `RANGES` are the only place an allowed value or range is written.
The `Section` base gives every section the same checks:

* `Section.problems_of(values)`: every problem of a mapping of the section's values (wrong
  type, unknown choice, out of range, and `cross_problems` between fields), one line each,
  naming the fix; the validator collects them over all sections;
* `from_mapping(values)`: the typed section from a dict or ConfigDict: unknown keys raise with
  the closest known key, missing ones take their default, problems raise `ValueError` (one
  line each). A section is checked once, when it is built.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a.b': value} of a nested mapping (a ConfigDict or a dict)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if hasattr(value, "items"):  # a section (dict or ConfigDict)
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def did_you_mean(key: str, known: Iterable[str]) -> str:
    """The message for an unknown key: the closest known key, else the section's keys."""
    known = sorted(known)
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if close:
        return f"unknown config key {key!r}; did you mean {close[0]!r}?"
    section = key.rpartition(".")[0]
    siblings = [k for k in known if k.rpartition(".")[0] == section]
    hint = f"; {section or 'the top level'} has {siblings}" if siblings else ""
    return f"unknown config key {key!r}{hint}"


def type_problem(key: str, value: Any, default: Any) -> str | None:
    """A value whose type does not match its default's (int where a float is due is fine)."""
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, int | float) and not isinstance(value, bool)
    elif isinstance(default, str):
        ok = isinstance(value, str)
    else:
        return None
    if ok:
        return None
    want = type(default).__name__
    return f"{key}={value!r} has type {type(value).__name__}; it must be of type {want}"


def range_problem(key: str, value: Any, low, high, inclusive: bool) -> str | None:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return None  # reported as a type problem
    too_low = low is not None and (value < low if inclusive else value <= low)
    too_high = high is not None and value > high
    if not (too_low or too_high):
        return None
    lo = "-inf" if low is None else low
    hi = "inf" if high is None else high
    return f"{key}={value} is out of range; it must be in {'[' if inclusive else '('}{lo}, {hi}]"


SUBSECTION = {"subsection": True}  # metadata of a field holding a typed subsection


def is_subsection(field: dataclasses.Field) -> bool:
    """A field that holds a subsection (its own typed config), not a value."""
    return bool(field.metadata.get("subsection"))


@dataclasses.dataclass(frozen=True)
class Section:
    """Base of the typed config sections (see the module docstring)."""

    NAME: ClassVar[str] = ""  # the section's key in the config, e.g. 'loss'
    CHOICES: ClassVar[dict[str, tuple[Any, ...]]] = {}  # field -> allowed values
    # (field, lowest, highest, low inclusive); None = unbounded.
    RANGES: ClassVar[tuple[tuple[str, Any, Any, bool], ...]] = ()

    def __post_init__(self) -> None:
        problems = self.problems_of(
            {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        )
        if problems:
            raise ValueError("\n".join(problems))

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """{field: default} of the section's own values (not its subsections)."""
        return {f.name: f.default for f in dataclasses.fields(cls) if not is_subsection(f)}

    @classmethod
    def schema(cls) -> dict[str, Any]:
        """The section as it appears in a config: its defaults, and any subsections' (a dict
        each; override)."""
        return cls.defaults()

    @classmethod
    def problems_of(cls, values: Mapping[str, Any]) -> list[str]:
        """Every problem of `values` (missing fields count as their defaults)."""
        full = {**cls.defaults(), **dict(values.items())}
        key = lambda name: f"{cls.NAME}.{name}" if cls.NAME else name
        problems = [type_problem(key(k), full[k], d) for k, d in cls.defaults().items()]
        problems = [p for p in problems if p]
        if problems:
            return problems  # choices and ranges assume the right types
        for name, choices in cls.CHOICES.items():
            if full[name] not in choices:
                problems.append(
                    f"{key(name)}={full[name]!r} is unknown; choose one of {list(choices)}"
                )
        for name, low, high, inclusive in cls.RANGES:
            problems.append(range_problem(key(name), full[name], low, high, inclusive))
        problems = [p for p in problems if p]
        return problems or cls.cross_problems(full)

    @classmethod
    def cross_problems(cls, values: dict[str, Any]) -> list[str]:
        """Problems between fields of the section (override); `values` has every field."""
        del values
        return []

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]):
        """The typed section of a dict or ConfigDict (unknown keys: a did-you-mean error)."""
        items = dict(values.items())
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(items) - known)
        if unknown:
            prefix = f"{cls.NAME}." if cls.NAME else ""
            names = [f"{prefix}{k}" for k in known]
            raise ValueError("\n".join(did_you_mean(f"{prefix}{k}", names) for k in unknown))
        return cls(**items)


def field_comments(cls: type) -> dict[str, str]:
    """{field: its comment} of a section class, read from its source: the comment after the
    field on its line, else the comment lines just above it."""
    import inspect
    import re

    try:
        lines = inspect.getsource(cls).splitlines()
    except (OSError, TypeError):
        return {}
    names = {f.name for f in dataclasses.fields(cls) if not is_subsection(f)}
    out: dict[str, str] = {}
    prev, block = None, []  # the last field with a comment, the comment lines since
    for line in lines:
        m = re.match(r"\s+(\w+): [^=]+=.*?(?:#\s*(.*))?$", line)
        if m and m.group(1) in names:
            if m.group(2):  # its own comment: the lines above continued the previous one's
                if prev and block:
                    out[prev] += " " + " ".join(block)
                out[m.group(1)], prev = m.group(2).strip(), m.group(1)
            else:
                out[m.group(1)], prev = " ".join(block), None
            block = []
        elif re.match(r"\s+#", line):
            block.append(line.strip().lstrip("#").strip())
        else:
            if prev and block:
                out[prev] += " " + " ".join(block)
            prev, block = None, []
    return out
