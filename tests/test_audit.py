"""The dataset audit: decoding problems, exact/near duplicates, conflicts, groups, JSON.

Images are small synthetic "ultrasound-like" textures made in each test
(horizontal tissue layers, blobs and speckle), so no data files are needed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.ndimage import gaussian_filter

from breastcad.data.audit import AuditReport, NearDupSettings, run_audit
from breastcad.data.sources import load_source
from breastcad.errors import BreastcadError, ConfigError

_SHARED_BUSI = Path(__file__).resolve().parents[2] / "shared" / "data" / "busi"
BUSI = Path(os.environ.get("BREASTCAD_BUSI", _SHARED_BUSI))


def texture(seed: int, h: int = 96, w: int = 128) -> np.ndarray:
    """A uint8 texture with structure at several scales; different seeds are unrelated."""
    rng = np.random.default_rng(seed)
    yy = np.arange(h, dtype=np.float32)[:, None]
    layers = np.sin(yy / rng.uniform(3.0, 7.0) + rng.uniform(0, 6)) * np.ones((1, w))
    blobs = gaussian_filter(rng.standard_normal((h, w)), 4) * 6
    speckle = gaussian_filter(rng.standard_normal((h, w)), 0.8)
    img = 0.35 * layers + blobs + 0.6 * speckle
    img = (img - img.min()) / (img.max() - img.min())
    return (img * 220 + 20).astype(np.uint8)


def save(path: Path, arr: np.ndarray, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, **kw)
    return path


def groups_of(report: AuditReport) -> list[set[str]]:
    return [{Path(p).name for p in g.paths} for g in report.duplicate_groups]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """benign/, malignant/, normal/ with planted duplicates of every kind.

    - b_exact_a / b_exact_b: identical pixels, one 8-bit gray PNG, one RGB PNG at
      another compression level (different bytes, same decoded image);
    - b_near_a / b_near_b: brightness and contrast changed plus noise;
    - b_crop_a / b_crop_b: the same frame, and a lateral crop keeping the left edge;
    - n_wide / n_center: a centred crop (side margins removed), in normal/;
    - b_conflict / m_conflict: the same image stored as benign and as malignant;
    - u1..u5: unrelated images.
    """
    root = tmp_path_factory.mktemp("dups")
    base = texture(1)
    save(root / "benign" / "b_exact_a.png", base)
    save(root / "benign" / "b_exact_b.png", np.stack([base] * 3, axis=-1), compress_level=1)

    near = texture(2).astype(np.float32)
    noise = np.random.default_rng(7).normal(0, 4, near.shape)
    save(root / "benign" / "b_near_a.png", near.astype(np.uint8))
    save(
        root / "benign" / "b_near_b.png", np.clip(near * 0.85 + 25 + noise, 0, 255).astype(np.uint8)
    )

    wide = texture(3, 96, 160)
    save(root / "benign" / "b_crop_a.png", wide)
    save(root / "benign" / "b_crop_b.png", wide[:, :128].copy())

    wide2 = texture(4, 96, 160)
    save(root / "normal" / "n_wide.png", wide2)
    save(root / "normal" / "n_center.png", wide2[:, 16:144].copy())

    conflict = texture(5)
    save(root / "benign" / "b_conflict.png", conflict)
    save(root / "malignant" / "m_conflict.png", conflict)

    for k in range(1, 6):
        cls = ("benign", "malignant", "normal")[k % 3]
        save(root / cls / f"u{k}.png", texture(100 + k))
    return root


@pytest.fixture(scope="module")
def report(dataset: Path) -> AuditReport:
    return run_audit(load_source(dataset))


def test_exact_duplicate_with_different_encoding(report: AuditReport) -> None:
    exact = [{Path(p).name for p in g.paths} for g in report.exact_groups]
    assert sorted(exact, key=min) == [
        {"b_conflict.png", "m_conflict.png"},
        {"b_exact_a.png", "b_exact_b.png"},
    ]
    a, b = (next(s.path for s in report.samples if s.path.endswith(n)) for n in exact[1])
    assert report.file_sha256[a] != report.file_sha256[b]  # different files ...
    assert report.pixel_sha256[a] == report.pixel_sha256[b]  # ... same decoded pixels
    assert all(len(h) == 64 for h in report.file_sha256.values())


def test_near_duplicates_and_crops_are_grouped(report: AuditReport) -> None:
    groups = groups_of(report)
    assert {"b_near_a.png", "b_near_b.png"} in groups
    assert {"b_crop_a.png", "b_crop_b.png"} in groups
    assert {"n_wide.png", "n_center.png"} in groups
    links = {
        frozenset({Path(lk.a).name, Path(lk.b).name}): lk
        for g in report.duplicate_groups
        for lk in g.links
    }
    assert links[frozenset({"b_near_a.png", "b_near_b.png"})].via == "whole"
    crop = links[frozenset({"b_crop_a.png", "b_crop_b.png"})]
    assert crop.kind == "near" and crop.crop_score is not None and crop.crop_score > 0.9


def test_different_images_are_not_grouped(report: AuditReport) -> None:
    grouped = {Path(p).name for p in report.duplicate_paths()}
    assert not any(n.startswith("u") for n in grouped)
    assert len(report.duplicate_groups) == 5
    # every sample has a split group; unrelated images each have their own
    groups = {Path(s.path).name: s.group for s in report.samples}
    assert all(g and g.startswith("g") for g in groups.values())
    assert len({groups[f"u{k}.png"] for k in range(1, 6)}) == 5
    assert groups["b_crop_a.png"] == groups["b_crop_b.png"]


def test_conflict_group_excluded_by_default(report: AuditReport) -> None:
    assert len(report.conflict_groups) == 1
    conflict = report.conflict_groups[0]
    assert conflict.labels == ["benign", "malignant"]
    assert {Path(p).name for p in conflict.paths} == {"b_conflict.png", "m_conflict.png"}
    usable = {Path(s.path).name for s in report.usable_samples()}
    assert "b_conflict.png" not in usable and "m_conflict.png" not in usable
    assert len(usable) == len(report.samples) - 2
    kept = {Path(s.path).name for s in report.usable_samples(keep_conflicts=True)}
    assert {"b_conflict.png", "m_conflict.png"} <= kept
    text = report.summary_text()
    assert "Conflicting labels: 1 group" in text and "m_conflict.png [malignant]" in text


def test_counts_and_summary(report: AuditReport) -> None:
    assert report.class_counts() == {"benign": 8, "malignant": 3, "normal": 4}
    sizes = report.size_stats()
    assert sizes["height"]["min"] == 96 and sizes["width"]["max"] == 160
    text = report.summary_text()
    assert "benign 8" in text and "15 readable, 0 unreadable" in text
    assert "Exact duplicates: 2 set(s) of identical images (4 images)" in text
    assert "covering 10 of 15 images (66.7%)" in text
    assert len(text.splitlines()) < 20


def test_group_ids_are_deterministic(dataset: Path, report: AuditReport) -> None:
    again = run_audit(load_source(dataset), settings=NearDupSettings(workers=1))
    assert [(s.path, s.group) for s in again.samples] == [(s.path, s.group) for s in report.samples]
    # numbered by the sorted first path of each group
    firsts = sorted(min(paths) for paths in report.split_groups().values())
    by_first = {min(paths): gid for gid, paths in report.split_groups().items()}
    assert [by_first[p] for p in firsts] == [f"g{k:04d}" for k in range(1, len(firsts) + 1)]


def test_json_atomic_with_schema_version(
    report: AuditReport, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "audit.json"
    report.write(out)
    doc = json.loads(out.read_text(encoding="utf-8"))
    assert doc["schema_version"] == 1
    assert doc["counts"]["conflict_groups"] == 1 and doc["counts"]["readable"] == 15
    assert doc["settings"]["hash_kind"] == "phash"
    conflict = next(g for g in doc["duplicate_groups"] if g["conflict"])
    assert {m["label"] for m in conflict["members"]} == {"benign", "malignant"}
    assert all("problem" in b for b in doc["bad_files"])
    assert [p.name for p in tmp_path.iterdir()] == ["audit.json"]  # no temp file left

    # a failed write leaves the previous file intact and says why in one line
    before = out.read_bytes()

    def boom(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("breastcad.io.os.replace", boom)
    with pytest.raises(BreastcadError, match="cannot write"):
        report.write(out)
    assert out.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["audit.json"]


def test_bad_files_are_listed_and_others_survive(tmp_path: Path) -> None:
    root = tmp_path / "data"
    save(root / "benign" / "good1.png", texture(11))
    save(root / "benign" / "good1_mask.png", np.full((96, 128), 255, np.uint8))
    save(root / "malignant" / "good2.png", texture(12))
    (root / "malignant" / "good2_mask.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (root / "benign" / "empty.png").write_bytes(b"")
    (root / "benign" / "corrupt.png").write_bytes(b"this is not an image at all")
    data = (root / "benign" / "good1.png").read_bytes()
    (root / "malignant" / "truncated.png").write_bytes(data[: len(data) // 2])
    (root / "malignant" / "folder.png").mkdir()
    (root / "benign" / "notes.txt").write_text("hello")
    (root / "benign" / "lost_mask.png").write_bytes(b"")

    report = run_audit(load_source(root))
    assert sorted(Path(s.path).name for s in report.samples) == ["good1.png", "good2.png"]
    problems = {Path(b.path).name: b.problem for b in report.bad_files}
    assert problems["empty.png"] == "empty file (0 bytes)"
    assert "directory" in problems["folder.png"]
    assert "not a recognised image format" in problems["corrupt.png"]
    assert "truncated" in problems["truncated.png"] or "corrupt" in problems["truncated.png"]
    assert "good2.png" in problems["good2_mask.png"]  # a bad mask names its image ...
    good2 = next(s for s in report.samples if s.path.endswith("good2.png"))
    assert good2.mask_paths == ()  # ... which is kept, without that mask
    assert report.images_without_masks() == {"benign": 0, "malignant": 1}
    assert [Path(p).name for p in report.orphan_masks] == ["lost_mask.png"]
    assert [Path(p).name for p in report.ignored] == ["notes.txt"]
    assert report.n_found == 6 and len(report.samples) == 2

    text = report.summary_text()
    assert "6 images found, 2 readable, 4 unreadable" in text
    assert "Bad files: 5" in text and "empty file (0 bytes)" in text
    assert "Masks without images: 1" in text
    doc = report.to_json_dict()
    assert {Path(b["path"]).name for b in doc["bad_files"]} >= {"empty.png", "folder.png"}
    # the file hash is recorded even for a file that does not decode
    assert any(p.endswith("corrupt.png") for p in report.file_sha256)


def test_manifest_patient_ids_merge_groups(tmp_path: Path) -> None:
    for k in range(4):
        save(tmp_path / "img" / f"p{k}.png", texture(20 + k))
    save(tmp_path / "img" / "p0_copy.png", texture(20))
    (tmp_path / "m.csv").write_text(
        "path,label,patient_id\n"
        "img/p0.png,benign,A\n"
        "img/p1.png,malignant,A\n"
        "img/p2.png,benign,B\n"
        "img/p3.png,benign,\n"
        "img/p0_copy.png,benign,C\n"
    )
    report = run_audit(load_source(tmp_path / "m.csv"))
    group = {Path(s.path).name: s.group for s in report.samples}
    # p0~p1 by patient A, p0~p0_copy by duplicate: one component across patients A and C
    assert group["p0.png"] == group["p1.png"] == group["p0_copy.png"]
    assert len({group["p0.png"], group["p2.png"], group["p3.png"]}) == 3
    assert report.conflict_groups == []  # a patient with two labels is not a conflict


def test_non_utf8_file_names(tmp_path: Path) -> None:
    root = tmp_path / "data"
    save(root / "benign" / "plain.png", texture(31))
    save(root / "malignant" / "other.png", texture(32))
    odd = os.fsdecode(os.fsencode(str(root / "benign")) + b"/caf\xe9\nx.png")
    save(Path(odd), texture(31))  # a duplicate of plain.png, with an undecodable name
    (root / "malignant").joinpath(os.fsdecode(b"bad\xff.png")).write_bytes(b"")

    report = run_audit(load_source(root))
    assert len(report.samples) == 3 and len(report.bad_files) == 1
    text = report.summary_text()
    text.encode("utf-8")  # strictly encodable
    assert "bad\\udcff.png: empty file" in text
    doc = report.to_json_dict()
    json.dumps(doc, ensure_ascii=False).encode("utf-8")
    out = report.write(tmp_path / "audit.json")
    json.loads(out.read_text(encoding="utf-8"))
    assert any("caf" in m["path"] for g in doc["duplicate_groups"] for m in g["members"])


def test_settings_are_validated() -> None:
    with pytest.raises(ConfigError, match="hash_kind"):
        NearDupSettings(hash_kind="md5")
    with pytest.raises(ConfigError, match="confirm_rule"):
        NearDupSettings(confirm_rule="ssim")
    with pytest.raises(ConfigError, match="max_hash_distance"):
        NearDupSettings(max_hash_distance=1000)
    assert NearDupSettings() == NearDupSettings()  # frozen, comparable, hashable
    hash(NearDupSettings())


def test_crops_can_be_switched_off(dataset: Path) -> None:
    report = run_audit(load_source(dataset), settings=NearDupSettings(crops=False))
    groups = groups_of(report)
    assert {"b_near_a.png", "b_near_b.png"} in groups
    assert {"b_crop_a.png", "b_crop_b.png"} not in groups


@pytest.mark.slow
@pytest.mark.ci
@pytest.mark.skipif(not BUSI.exists(), reason=f"real BUSI not found at {BUSI}")
def test_real_busi_finds_cross_class_duplicate() -> None:
    report = run_audit(load_source(BUSI))
    assert len(report.samples) == 780 and not report.bad_files
    assert any(set(g.labels) == {"benign", "malignant"} for g in report.conflict_groups)
    # at least one image is stored, pixel for pixel, under two classes
    assert any(len({s.label for s in g.members}) > 1 for g in report.exact_groups)
    share = len(report.duplicate_paths()) / len(report.samples)
    assert 0.19 <= share <= 0.5


def test_nothing_readable_and_single_image(tmp_path: Path) -> None:
    (tmp_path / "a" / "benign").mkdir(parents=True)
    (tmp_path / "a" / "malignant").mkdir(parents=True)
    (tmp_path / "a" / "benign" / "x.png").write_bytes(b"")
    (tmp_path / "a" / "malignant" / "y.png").write_bytes(b"junk")
    empty = run_audit(load_source(tmp_path / "a"))
    assert empty.samples == [] and len(empty.bad_files) == 2
    assert "0 readable, 2 unreadable" in empty.summary_text()
    assert empty.to_json_dict()["counts"]["duplicate_group_share"] == 0.0

    save(tmp_path / "b" / "benign" / "only.png", texture(41))
    (tmp_path / "b" / "normal").mkdir()
    single = run_audit(load_source(tmp_path / "b"))
    assert [s.group for s in single.samples] == ["g0001"]
    assert single.duplicate_groups == []
