"""The measurement catalogue (measurements.toml): device codes -> LOINC, UCUM, conversions, ranges."""
from __future__ import annotations

import functools
import pathlib
import tomllib
from dataclasses import dataclass

from vigil.codes import LOINC

CATALOGUE_FILE = pathlib.Path(__file__).with_name("measurements.toml")


@dataclass(frozen=True, slots=True)
class Measurement:
    key: str
    loinc: str
    display: str
    category: str
    profile: str
    ucum: str
    inputs: tuple[str, ...]
    convert: dict[str, tuple[float, float]]
    plausible: tuple[float, float]
    extra_codings: tuple[tuple[str, str, str], ...] = ()
    components: tuple[str, ...] = ()  # panel: keys of the measurements allowed as components
    required: tuple[str, ...] = ()  # panel: keys that must be present

    def to_canonical(self, value: float, unit: str) -> float | None:
        """Value in the catalogue's UCUM unit, or None when `unit` is not accepted."""
        if unit == self.ucum:
            return value
        conv = self.convert.get(unit)
        if conv is None:
            return None
        # Rounded to 10 significant digits so that e.g. 0.35 (fraction) -> 35 % and 100.4 [degF] -> 38 Cel
        # carry no binary float noise; far below any device's precision.
        return float(f"{value * conv[0] + conv[1]:.10g}")

    def is_plausible(self, value: float) -> bool:
        return self.plausible[0] <= value <= self.plausible[1]

    @property
    def accepted_units(self) -> tuple[str, ...]:
        return (self.ucum, *self.convert)


class Catalogue:
    """Lookup by Vigil key or by (system, code) as a device sends it."""

    def __init__(self, measurements: list[Measurement]):
        self.measurements = measurements
        self.by_key = {m.key: m for m in measurements}
        self.by_input: dict[tuple[str, str], Measurement] = {}
        for m in measurements:
            for token in m.inputs:
                system, code = token.split("|", 1)
                if (system, code) in self.by_input:
                    raise ValueError(f"input code {token} is mapped twice")
                self.by_input[(system, code)] = m

    def lookup(self, code: str, system: str = "") -> Measurement | None:
        return self.by_input.get((system or LOINC, code))


def _parse(raw: dict) -> Measurement:
    return Measurement(
        key=raw["key"], loinc=raw["loinc"], display=raw["display"], category=raw["category"],
        profile=raw["profile"], ucum=raw["ucum"], inputs=tuple(raw["inputs"]),
        convert={u: (float(f), float(o)) for u, f, o in raw["convert"]},
        plausible=(float(raw["plausible"][0]), float(raw["plausible"][1])),
        extra_codings=tuple(tuple(c.split("|", 2)) for c in raw.get("extra_codings", [])),
        components=tuple(raw.get("components", [])), required=tuple(raw.get("required", [])),
    )


@functools.cache
def load_catalogue(path: pathlib.Path = CATALOGUE_FILE) -> Catalogue:
    with open(path, "rb") as fh:
        data = tomllib.load(fh)
    cat = Catalogue([_parse(m) for m in data["measurement"]])
    for m in cat.measurements:
        unknown = [k for k in (*m.components, *m.required) if k not in cat.by_key]
        if unknown:
            raise ValueError(f"panel {m.key} names unknown components {unknown}")
    return cat
