"""The one coercion engine (`mplug_fast.config.coerce`): plain data -> typed dataclasses and back.

Oracles: hand-written expected objects and the exact error texts (field, expected type, value, source)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

import pytest

from mplug_fast.config import ConfigError, apply_overrides, from_mapping, load_yaml, to_mapping


@dataclass(frozen=True)
class Inner:
    size: int = 4
    scale: float = 1.0

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"inner.size must be >= 1, got {self.size}")


@dataclass
class Outer:
    name: str = "x"
    mode: Literal["a", "b"] = "a"
    flag: bool = False
    limit: int | None = None
    pair: tuple[int, int] = (1, 2)
    many: tuple[float, ...] = ()
    tags: list[str] = field(default_factory=list)
    weights: dict[str, float] = field(default_factory=dict)
    free: dict[str, Any] = field(default_factory=dict)
    inner: Inner = field(default_factory=Inner)


def test_builds_nested_frozen_dataclasses_with_conversions():
    got = from_mapping(
        Outer,
        {
            "mode": "b",
            "limit": 3,
            "pair": [5, 6],
            "many": [1, "2e-1"],
            "tags": ["p"],
            "weights": {"w": 1},
            "free": {"any": [1, "x"]},
            "inner": {"scale": 2},
        },
    )
    assert got == Outer(
        mode="b",
        limit=3,
        pair=(5, 6),
        many=(1.0, 0.2),
        tags=["p"],
        weights={"w": 1.0},
        free={"any": [1, "x"]},
        inner=Inner(scale=2.0),
    )
    assert isinstance(got.inner.scale, float) and isinstance(got.weights["w"], float)
    assert from_mapping(Outer, None) == Outer()
    assert from_mapping(Outer, to_mapping(got)) == got  # round trip
    assert to_mapping(got)["pair"] == [5, 6]  # tuples become lists (plain YAML / JSON)


@pytest.mark.parametrize(
    "data, message",
    [
        ({"nmae": "y"}, r"^f\.yaml: unknown key 'nmae'; valid keys of the config: \['flag', "),
        (
            {"inner": {"sise": 1}},
            r"^f\.yaml: unknown key 'inner\.sise'; valid keys of inner: \['scale', 'size'\]",
        ),
        ({"inner": {"size": "4"}}, r"^f\.yaml: inner\.size must be an integer, got str '4'$"),
        ({"inner": {"size": 0}}, r"^f\.yaml: inner\.size must be >= 1, got 0$"),
        ({"inner": {"scale": [1.0]}}, r"inner\.scale must be a number, got list \[1\.0\]"),
        ({"inner": 3}, r"inner must be a mapping, got int 3"),
        ({"mode": "c"}, r"mode must be one of \['a', 'b'\], got 'c'"),
        ({"flag": 1}, r"flag must be true or false, got int 1"),
        ({"limit": 2.5}, r"limit must be an integer, got float 2\.5"),
        ({"name": None}, r"name may not be null \(expected str\)"),
        ({"pair": [1]}, r"pair must have 2 items, got 1"),
        ({"pair": 1}, r"pair must be a list \(tuple\), got int 1"),
        ({"tags": ["a", 2]}, r"tags\[1\] must be a string, got int 2"),
        ({"weights": {"w": "heavy"}}, r"weights\.w must be a number, got str 'heavy'"),
        ({"weights": [1]}, r"weights must be a mapping, got list"),
    ],
)
def test_errors_name_the_field_the_value_and_the_file(data, message):
    with pytest.raises(ConfigError, match=message):
        from_mapping(Outer, data, where="f.yaml")


def test_prefix_names_an_embedded_section():
    """What a task's typed options use: the dotted place of the mapping inside the run config."""
    with pytest.raises(ConfigError, match=r"^run\.yaml: unknown key 'objective\.options\.sise'"):
        from_mapping(Inner, {"sise": 1}, where="run.yaml", prefix="objective.options")


def test_overrides_are_checked_like_files():
    data = apply_overrides(
        Outer, {"inner": {"size": 2}}, ["inner.scale=1e-3", "free.a.b=[1, 2]", "limit=null"]
    )
    assert data == {"inner": {"size": 2, "scale": 1e-3}, "free": {"a": {"b": [1, 2]}}, "limit": None}
    assert from_mapping(Outer, data).inner == Inner(size=2, scale=1e-3)
    for text, message in [
        ("inner.sise=1", r"^--set inner\.sise=1: unknown key 'inner\.sise'; valid keys of inner"),
        ("inner.size=big", r"^--set inner\.size=big: inner\.size must be an integer, got str 'big'"),
        ("name.x=1", r"'name' is a value, not a section"),
        ("inner", r"must look like key\.path=value"),
    ]:
        with pytest.raises(ConfigError, match=message):
            apply_overrides(Outer, {}, [text])


def test_yaml_reads_exponents_as_floats_and_keeps_the_rest():
    assert load_yaml("a: 1e-4\nb: 10\nc: 1.0e5\nd: x1e3\ne: '1e-4'\nf: .5") == {
        "a": 1e-4,
        "b": 10,
        "c": 1e5,
        "d": "x1e3",
        "e": "1e-4",
        "f": 0.5,
    }


def test_unsupported_annotations_are_a_programming_error():
    @dataclass
    class Odd:
        value: set[int] = dataclasses.field(default_factory=set)

    with pytest.raises(TypeError, match="not supported by the config engine"):
        from_mapping(Odd, {"value": [1]})
