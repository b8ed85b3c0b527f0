"""The sample record every data source produces, and the classification tasks."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Sample:
    """One image, as found by a data source.

    ``label`` is the class name the source gives (e.g. ``benign``); the task
    decides how class names map to targets. ``group`` is a patient id from a
    manifest, or ``None`` until the audit assigns duplicate clusters.
    """

    path: str
    label: str
    group: str | None = None
    mask_paths: tuple[str, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class BadFile:
    """A file that was skipped, with the reason, so the audit can list it."""

    path: str
    problem: str

    def __str__(self) -> str:
        return f"{self.path}: {self.problem}"


@dataclass(frozen=True)
class Task:
    """How source labels become training targets.

    ``classes`` are the target names in index order; ``label_map`` maps a source
    label to a target index; labels absent from the map are left out. The
    positive class (for AUC and the operating point) is ``classes[positive]``.
    """

    name: str
    classes: tuple[str, ...]
    label_map: dict[str, int]
    positive: int

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def target(self, label: str) -> int | None:
        return self.label_map.get(label.lower())


TASKS: dict[str, Task] = {
    "benign-vs-malignant": Task(
        "benign-vs-malignant", ("benign", "malignant"), {"benign": 0, "malignant": 1}, positive=1
    ),
    "three-class": Task(
        "three-class",
        ("normal", "benign", "malignant"),
        {"normal": 0, "benign": 1, "malignant": 2},
        positive=2,
    ),
    "malignant-vs-rest": Task(
        "malignant-vs-rest",
        ("rest", "malignant"),
        {"normal": 0, "benign": 0, "malignant": 1},
        positive=1,
    ),
}


def get_task(name: str) -> Task:
    from breastcad.errors import ConfigError

    try:
        return TASKS[name]
    except KeyError:
        raise ConfigError(f"unknown task {name!r}; valid tasks: {', '.join(TASKS)}") from None
