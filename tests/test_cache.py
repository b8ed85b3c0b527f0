"""The decode-once image cache: keys, damaged entries, concurrent builders, read-only inputs."""

from __future__ import annotations

import io
import multiprocessing as mp
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from breastcad.data import cache
from breastcad.data.cache import load_stack
from breastcad.data.imageio import file_sha256, read_image

SIZE = 16


def _write_png(path: Path, seed: int, shape: tuple[int, int] = (40, 30)) -> Path:
    arr = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def _images(root: Path, n: int) -> tuple[list[str], list[str]]:
    paths = [str(_write_png(root / f"img{i:02d}.png", seed=i)) for i in range(n)]
    return paths, [file_sha256(p) for p in paths]


def _entries(cache_dir: Path) -> list[Path]:
    return sorted(cache_dir.glob("*.npy"))


def _expected(path: str, size: int = SIZE) -> np.ndarray:
    return cache.resize_to_uint8(read_image(path), size)


@pytest.fixture
def decodes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Paths the cache decoded (a miss), in order."""
    seen: list[str] = []

    def counting(path: str, max_pixels: int = 0) -> np.ndarray:
        seen.append(str(path))
        return read_image(path, max_pixels=max_pixels)

    monkeypatch.setattr(cache, "read_image", counting)
    return seen


def test_load_stack_returns_uint8_n_s_s(tmp_path: Path) -> None:
    paths, hashes = _images(tmp_path / "img", 3)
    out = load_stack(paths, hashes, SIZE, tmp_path / "cache")
    assert out.dtype == np.uint8 and out.shape == (3, SIZE, SIZE)
    assert out.flags.c_contiguous
    for i, p in enumerate(paths):
        assert np.array_equal(out[i], _expected(p))
    again = load_stack(paths, hashes, SIZE, tmp_path / "cache")  # from the cache now
    assert again.dtype == np.uint8 and np.array_equal(again, out)


def test_a_changed_file_gets_a_new_entry_and_new_pixels(tmp_path: Path, decodes) -> None:
    cdir = tmp_path / "cache"
    path = _write_png(tmp_path / "a.png", seed=1)
    old = load_stack([str(path)], [file_sha256(path)], SIZE, cdir)
    assert len(_entries(cdir)) == 1 and len(decodes) == 1

    _write_png(path, seed=2)  # same name, new content
    new = load_stack([str(path)], [file_sha256(path)], SIZE, cdir)
    assert len(decodes) == 2, "the changed file was not decoded again"
    assert len(_entries(cdir)) == 2
    assert not np.array_equal(new, old)
    assert np.array_equal(new[0], _expected(str(path)))


def test_a_changed_size_does_not_reuse_entries(tmp_path: Path, decodes) -> None:
    cdir = tmp_path / "cache"
    paths, hashes = _images(tmp_path / "img", 2)
    load_stack(paths, hashes, SIZE, cdir)
    assert len(decodes) == 2
    other = load_stack(paths, hashes, SIZE + 8, cdir)
    assert len(decodes) == 4 and other.shape == (2, SIZE + 8, SIZE + 8)
    assert len(_entries(cdir)) == 4
    load_stack(paths, hashes, SIZE, cdir)  # both sizes stay cached side by side
    assert len(decodes) == 4


def test_a_new_preprocess_version_does_not_reuse_entries(
    tmp_path: Path, decodes, monkeypatch: pytest.MonkeyPatch
) -> None:
    cdir = tmp_path / "cache"
    paths, hashes = _images(tmp_path / "img", 2)
    load_stack(paths, hashes, SIZE, cdir)
    old_entries = _entries(cdir)
    # Poison the old entries: if the new version read them, it would return zeros.
    for e in old_entries:
        buf = io.BytesIO()
        np.save(buf, np.zeros((SIZE, SIZE), np.uint8))
        e.write_bytes(buf.getvalue())

    monkeypatch.setattr(cache, "PREPROCESS_VERSION", "test-version-2")
    out = load_stack(paths, hashes, SIZE, cdir)
    assert len(decodes) == 4
    assert set(_entries(cdir)) > set(old_entries)
    for i, p in enumerate(paths):
        assert np.array_equal(out[i], _expected(p))


def _damage(kind: str, good: bytes) -> bytes:
    header = good[: len(good) - SIZE * SIZE]
    return {
        "truncated-data": good[: len(good) - 7],
        "header-only": header,
        "truncated-header": good[:20],
        "empty": b"",
        "garbage": b"not a numpy file at all" * 4,
        "zip-magic": b"PK\x03\x04" + b"\0" * 100,
        # A corrupted header claiming a huge shape: must not be allocated.
        "huge-shape": _header((4_000_000_000_000, SIZE)) + good[len(header) :],
        "wrong-dtype": _npy(np.zeros((SIZE, SIZE), np.float32)),
        "wrong-shape": _npy(np.zeros((SIZE, SIZE + 1), np.uint8)),
    }[kind]


def _header(shape: tuple[int, ...]) -> bytes:
    buf = io.BytesIO()
    header = {"descr": "|u1", "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(buf, header)
    return buf.getvalue()


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


@pytest.mark.parametrize(
    "kind",
    ["truncated-data", "header-only", "truncated-header", "empty", "garbage", "zip-magic",
     "huge-shape", "wrong-dtype", "wrong-shape"],
)  # fmt: skip
def test_a_damaged_entry_is_rebuilt_not_trusted(tmp_path: Path, decodes, kind: str) -> None:
    cdir = tmp_path / "cache"
    paths, hashes = _images(tmp_path / "img", 1)
    first = load_stack(paths, hashes, SIZE, cdir)
    (entry,) = _entries(cdir)
    good = entry.read_bytes()
    entry.write_bytes(_damage(kind, good))

    out = load_stack(paths, hashes, SIZE, cdir)
    assert len(decodes) == 2, "the damaged entry was used instead of decoding again"
    assert np.array_equal(out, first)
    assert entry.read_bytes() == good, "the damaged entry was not rewritten"


def _build_in_child(paths: list[str], hashes: list[str], cache_dir: str, out: str, barrier) -> None:
    barrier.wait(timeout=60)  # both processes start building at the same moment
    np.save(out, load_stack(paths, hashes, SIZE, cache_dir, workers=2))


def test_two_processes_building_the_same_cache_both_succeed(tmp_path: Path) -> None:
    paths, hashes = _images(tmp_path / "img", 24)
    cdir = tmp_path / "cache"
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(2)
    outs = [str(tmp_path / f"out{k}.npy") for k in range(2)]
    procs = [
        ctx.Process(target=_build_in_child, args=(paths, hashes, str(cdir), out, barrier))
        for out in outs
    ]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=120)
    assert [proc.exitcode for proc in procs] == [0, 0]
    a, b = (np.load(out) for out in outs)
    expected = np.stack([_expected(p) for p in paths])
    assert a.dtype == np.uint8 and np.array_equal(a, b) and np.array_equal(a, expected)
    assert sorted(os.listdir(cdir)) == sorted(e.name for e in _entries(cdir)), "temp files left"
    assert len(_entries(cdir)) == len(paths)
    assert np.array_equal(load_stack(paths, hashes, SIZE, cdir), expected)


def test_input_files_are_never_modified(tmp_path: Path) -> None:
    paths, hashes = _images(tmp_path / "img", 3)
    before = {p: (Path(p).read_bytes(), os.stat(p).st_mtime_ns) for p in paths}
    cdir = tmp_path / "cache"
    load_stack(paths, hashes, SIZE, cdir)  # cold
    load_stack(paths, hashes, SIZE, cdir)  # warm
    _entries(cdir)[0].write_bytes(b"")  # damaged: rebuilt from the input file
    load_stack(paths, hashes, SIZE + 4, cdir)  # another size
    load_stack(paths, hashes, SIZE, cdir)
    after = {p: (Path(p).read_bytes(), os.stat(p).st_mtime_ns) for p in paths}
    assert after == before
    assert sorted(os.listdir(tmp_path / "img")) == sorted(os.path.basename(p) for p in paths)
