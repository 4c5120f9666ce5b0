"""Reading PhysioNet/CinC 2019 stays (.psv), from a folder or the challenge's .tar.gz.

Data: Reyna MA et al., Early Prediction of Sepsis From Clinical Data: the PhysioNet/Computing in
Cardiology Challenge 2019. Crit Care Med 48(2):210-217 (2020); PhysioNet (2019)
https://doi.org/10.13026/v64v-d857. CC BY 4.0.
"""
from __future__ import annotations

import io
import pathlib
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

COLUMNS = ["HR", "O2Sat", "Temp", "SBP", "MAP", "DBP", "Resp", "EtCO2", "BaseExcess", "HCO3", "FiO2", "pH", "PaCO2", "SaO2", "AST", "BUN", "Alkalinephos", "Calcium", "Chloride", "Creatinine", "Bilirubin_direct", "Glucose", "Lactate", "Magnesium", "Phosphate", "Potassium", "Bilirubin_total", "TroponinI", "Hct", "Hgb", "PTT", "WBC", "Fibrinogen", "Platelets", "Age", "Gender", "Unit1", "Unit2", "HospAdmTime", "ICULOS", "SepsisLabel"]
MEASUREMENT_COLUMNS = COLUMNS[:34]  # vitals 0-7, labs 8-33
COL = {name: i for i, name in enumerate(COLUMNS)}
# Units the data set records each column in, where they differ from the catalogue's UCUM unit.
SOURCE_UNITS = {"FiO2": "1"}


@dataclass(frozen=True)
class Stay:
    stem: str  # e.g. p000001
    data: np.ndarray  # rows x 41, NaN where missing

    @property
    def iculos(self) -> np.ndarray:
        return self.data[:, COL["ICULOS"]].astype(int)

    @property
    def labels(self) -> np.ndarray:
        return self.data[:, COL["SepsisLabel"]].astype(int)


def parse_psv(stem: str, text: bytes | str) -> Stay:
    if isinstance(text, bytes):
        text = text.decode()
    lines = text.strip("\n").split("\n")
    header = lines[0].split("|")
    if header != COLUMNS:
        raise ValueError(f"{stem}: unexpected header")
    data = np.array([[float(x) for x in ln.split("|")] for ln in lines[1:]], dtype=np.float64)
    return Stay(stem, data.reshape(-1, len(COLUMNS)))


def iter_stays(path: str | pathlib.Path, limit: int | None = None) -> Iterator[Stay]:
    """Stays in file-name order from a folder of .psv files or a .tar.gz of them."""
    path = pathlib.Path(path)
    n = 0
    if path.is_dir():
        for f in sorted(path.rglob("*.psv")):
            if limit is not None and n >= limit:
                return
            yield parse_psv(f.stem, f.read_bytes())
            n += 1
        return
    with tarfile.open(path, "r:*") as tar:
        for member in tar:  # the archive is sorted by name
            if not member.isfile() or not member.name.endswith(".psv"):
                continue
            if limit is not None and n >= limit:
                return
            fh = tar.extractfile(member)
            assert fh is not None
            yield parse_psv(pathlib.PurePosixPath(member.name).stem, io.BytesIO(fh.read()).read())
            n += 1


def default_dataset() -> pathlib.Path:
    """../shared/data/physionet2019/training_setA.tar.gz relative to the repo, or $VIGIL_DATASET."""
    import os

    if os.environ.get("VIGIL_DATASET"):
        return pathlib.Path(os.environ["VIGIL_DATASET"])
    repo = pathlib.Path(__file__).resolve().parent.parent
    return repo.parent / "shared" / "data" / "physionet2019" / "training_setA.tar.gz"
