"""Data sources: BUSI / class folders and CSV manifests."""

from __future__ import annotations

import errno
import os
import sys

import pytest

from breastcad.data.records import BadFile, Sample
from breastcad.data.sources import (
    SourceResult,
    load_class_folders,
    load_manifest,
    load_source,
)
from breastcad.errors import DataError

BUSI_FILES = [
    "benign/benign (1).png",
    "benign/benign (1)_mask.png",
    "benign/benign (1)_mask_1.png",
    "benign/benign (2).png",
    "benign/benign (9)_mask.png",  # its image is missing: an orphan
    "malignant/malignant (1).png",
    "malignant/malignant (1)_mask.png",
    "normal/normal (1).png",
    "normal/normal (1)_mask.png",
]


def _paths(result: SourceResult) -> list[str]:
    return [s.path for s in result.samples]


def _data_error(fn, *args) -> DataError:
    with pytest.raises(DataError) as info:
        fn(*args)
    return info.value


# ------------------------------------------------------------------ class folders


def test_busi_layout(make_tree):
    root = make_tree("busi", BUSI_FILES)
    r = load_source(root)

    def p(rel: str) -> str:
        return str(root / rel)

    assert r.kind == "busi-folders"
    assert r.root == str(root)
    assert r.samples == [
        Sample(
            p("benign/benign (1).png"),
            "benign",
            None,
            (p("benign/benign (1)_mask.png"), p("benign/benign (1)_mask_1.png")),
        ),
        Sample(p("benign/benign (2).png"), "benign", None, ()),
        Sample(
            p("malignant/malignant (1).png"),
            "malignant",
            None,
            (p("malignant/malignant (1)_mask.png"),),
        ),
        Sample(p("normal/normal (1).png"), "normal", None, (p("normal/normal (1)_mask.png"),)),
    ]
    assert r.orphan_masks == [p("benign/benign (9)_mask.png")]
    assert r.bad == [] and r.ignored == []
    assert not any("_mask" in s.path for s in r.samples)  # masks never become samples


@pytest.mark.parametrize("mask_name", ["a_mask.png", "a_MASK.png", "a_mask_1.png", "a_mask_12.png"])
def test_mask_names_attach_to_their_image(make_tree, mask_name):
    root = make_tree("ds", ["benign/a.png", f"benign/{mask_name}", "malignant/b.png"])
    r = load_source(root)
    assert _paths(r) == [str(root / "benign/a.png"), str(root / "malignant/b.png")]
    assert r.samples[0].mask_paths == (str(root / "benign" / mask_name),)
    assert r.orphan_masks == []


def test_png_mask_attaches_to_jpeg_image(make_tree):
    # Masks match by folder + stem: the bundled copy stores JPEG images, PNG masks.
    root = make_tree(
        "ds", ["benign/a.jpg", "benign/a_mask.png", "benign/b_mask.png", "malignant/c.png"]
    )
    r = load_source(root)
    assert r.samples[0] == Sample(
        str(root / "benign/a.jpg"), "benign", None, (str(root / "benign/a_mask.png"),)
    )
    assert r.orphan_masks == [str(root / "benign/b_mask.png")]


def test_masks_in_nested_folders_attach_within_their_folder(make_tree):
    root = make_tree(
        "ds", ["benign/s1/a.png", "benign/s1/a_mask.png", "benign/s2/a_mask.png", "malignant/b.png"]
    )
    r = load_source(root)
    assert r.samples[0].mask_paths == (str(root / "benign/s1/a_mask.png"),)
    assert r.orphan_masks == [str(root / "benign/s2/a_mask.png")]


@pytest.mark.parametrize("wrapper", ["Dataset_BUSI_with_GT", "busi/Dataset_BUSI_with_GT", "a/b/c"])
def test_wrapper_folders_are_descended(make_tree, wrapper):
    root = make_tree("download", [f"{wrapper}/{f}" for f in BUSI_FILES])
    (root / ".DS_Store").write_text("x")  # hidden files do not stop the descent
    r = load_source(root)
    assert r.root == str(root / wrapper)
    assert [s.label for s in r.samples] == ["benign", "benign", "malignant", "normal"]
    assert r.orphan_masks == [str(root / wrapper / "benign/benign (9)_mask.png")]


def test_generic_class_folders_with_nested_subfolders(make_tree):
    root = make_tree(
        "ds",
        [
            "Benign/site1/a.png",
            "Benign/site2/deep/b.jpg",
            "Benign/top.bmp",
            "Malignant/c.dcm",
            "Malignant/x/y/z.tif",
        ],
    )
    r = load_source(root)
    assert r.kind == "class-folders"
    assert [(os.path.relpath(s.path, root), s.label) for s in r.samples] == [
        ("Benign/site1/a.png", "benign"),
        ("Benign/site2/deep/b.jpg", "benign"),
        ("Benign/top.bmp", "benign"),
        ("Malignant/c.dcm", "malignant"),
        ("Malignant/x/y/z.tif", "malignant"),
    ]
    assert all(s.group is None and s.mask_paths == () for s in r.samples)


def test_hidden_files_and_folders_are_ignored(make_tree):
    root = make_tree(
        "ds",
        [
            "benign/a.png",
            "benign/.DS_Store",
            "benign/._a.png",
            "benign/.cache/h.png",
            "malignant/b.png",
            ".hidden_class/c.png",
        ],
    )
    r = load_source(root)
    assert _paths(r) == [str(root / "benign/a.png"), str(root / "malignant/b.png")]
    assert r.ignored == [] and r.bad == [] and r.orphan_masks == []


def test_non_image_files_are_listed_in_ignored(make_tree):
    root = make_tree(
        "ds",
        [
            "benign/a.png",
            "benign/notes.txt",
            "benign/Thumbs.db",
            "benign/sub/labels.csv",
            "malignant/b.png",
            "malignant/b.png.bak",
        ],
    )
    r = load_source(root)
    assert _paths(r) == [str(root / "benign/a.png"), str(root / "malignant/b.png")]
    assert r.ignored == [
        str(root / "benign/Thumbs.db"),
        str(root / "benign/notes.txt"),
        str(root / "benign/sub/labels.csv"),
        str(root / "malignant/b.png.bak"),
    ]


def test_image_named_special_entries_are_kept_for_the_audit(make_tree):
    root = make_tree("ds", ["benign/a.png", "malignant/b.png"])
    ben = root / "benign"
    (ben / "dir.png").mkdir()
    os.mkfifo(ben / "fifo.png")
    os.symlink(ben / "nowhere.png", ben / "dangling.png")
    os.symlink("loop.png", ben / "loop.png")
    os.symlink(".", ben / "again")  # a folder link back to itself: not followed
    r = load_source(root)  # returns promptly: nothing is opened or followed
    assert _paths(r) == [
        str(ben / "a.png"),
        str(ben / "dangling.png"),
        str(ben / "dir.png"),
        str(ben / "fifo.png"),
        str(ben / "loop.png"),
        str(root / "malignant/b.png"),
    ]
    assert r.ignored == [str(ben / "again")]


@pytest.mark.parametrize("where", ["benign/sub", "benign"])
def test_unlistable_folder_is_reported_and_the_rest_kept(make_tree, monkeypatch, where):
    root = make_tree("ds", ["benign/a.png", "benign/sub/s.png", "malignant/b.png"])
    blocked = str(root / where)
    real_scandir = os.scandir

    def scandir(path=".", *args):
        if os.fspath(path) == blocked:
            raise PermissionError(errno.EACCES, "Permission denied", blocked)
        return real_scandir(path, *args)

    monkeypatch.setattr(os, "scandir", scandir)
    r = load_source(root)
    assert r.bad == [BadFile(blocked, "cannot list folder (Permission denied)")]
    assert str(root / "malignant/b.png") in _paths(r)
    if where == "benign/sub":
        assert _paths(r) == [str(root / "benign/a.png"), str(root / "malignant/b.png")]


def test_order_is_sorted_and_deterministic(make_tree):
    # Created deliberately out of order.
    root = make_tree(
        "ds",
        ["normal/z.png", "malignant/b2.png", "malignant/b10.png", "benign/c/x.png", "benign/a.png"],
    )
    first = load_source(root)
    assert [os.path.relpath(p, root) for p in _paths(first)] == [
        "benign/a.png",
        "benign/c/x.png",
        "malignant/b10.png",
        "malignant/b2.png",
        "normal/z.png",
    ]
    assert _paths(first) == sorted(_paths(first))
    assert load_source(str(root)).samples == first.samples


needs_bytes_names = pytest.mark.skipif(
    sys.platform != "linux" or sys.getfilesystemencoding().lower() not in ("utf-8", "utf8"),
    reason="needs a file system that accepts undecodable byte names",
)


@needs_bytes_names
def test_non_utf8_file_name_is_listed(make_tree):
    root = make_tree("ds", ["benign/a.png", "malignant/b.png"])
    raw = os.path.join(os.fsencode(root), b"benign", b"caf\xe9.png")
    with open(raw, "wb") as fh:
        fh.write(b"x")
    r = load_source(root)
    assert os.fsdecode(raw) in _paths(r)
    assert len(r.samples) == 3


def test_bundled_busi_copy():
    from breastcad.data.sources import bundled_busi_path

    assert bundled_busi_path().is_dir(), "the package must ship its BUSI copy"
    r = load_source(None)
    assert r.kind == "busi-folders"
    assert r.root == str(bundled_busi_path())
    assert {s.label for s in r.samples} <= {"benign", "malignant", "normal"}
    assert not any("_mask" in os.path.basename(s.path) for s in r.samples)
    assert any(s.mask_paths for s in r.samples)
    assert r.bad == []


# ------------------------------------------------------------- class-folder errors


def test_missing_folder(tmp_path, assert_clean_error):
    root = tmp_path / "nope"
    err = _data_error(load_source, root)
    assert_clean_error(err, root, "no such file or folder")


def test_empty_folder(make_tree, assert_clean_error):
    root = make_tree("empty")
    err = _data_error(load_source, root)
    assert_clean_error(err, root, "no class folders found (expected one sub-folder per class)")


@pytest.mark.parametrize(
    "files",
    [["a.png", "b.png"], ["a.png", ".hidden/b.png"], ["readme.txt", "a.png"]],
    ids=["images-only", "hidden-dir-only", "files-only"],
)
def test_folder_without_class_subfolders(make_tree, assert_clean_error, files):
    root = make_tree("flat", files)
    err = _data_error(load_source, root)
    assert_clean_error(err, root, "no class folders found")


def test_mask_only_folder(make_tree, assert_clean_error):
    root = make_tree("masks", ["benign/a_mask.png", "malignant/b_mask_1.png"])
    err = _data_error(load_source, root)
    assert_clean_error(err, root, "found only mask files in its class folders")


def test_class_folders_without_images(make_tree, assert_clean_error):
    root = make_tree("noimg", ["benign/notes.txt", "malignant/sub/x.csv"])
    (root / "normal").mkdir()
    err = _data_error(load_source, root)
    assert_clean_error(err, root, "found no image files in its class folders")


def test_wrapper_around_nothing(make_tree, assert_clean_error):
    root = make_tree("wrap")
    (root / "Dataset").mkdir()
    err = _data_error(load_source, root)
    # an empty wrapper is not descended: the root's only class folder holds no images
    assert_clean_error(err, root, "no image files")


@pytest.mark.parametrize("kind", ["text-file", "fifo", "broken-link"])
def test_not_a_folder_or_csv(tmp_path, assert_clean_error, kind):
    path = tmp_path / ("data.txt" if kind == "text-file" else "data.csv")
    if kind == "text-file":
        path.write_text("hello")
    elif kind == "fifo":
        os.mkfifo(path)  # must not be opened (it would block)
    else:
        os.symlink(tmp_path / "gone", path)
    err = _data_error(load_source, path)
    assert_clean_error(err, path, "not a folder of class folders or a .csv manifest")


def test_unlistable_root_is_a_data_error(make_tree, monkeypatch, assert_clean_error):
    root = make_tree("ds", ["benign/a.png"])

    def scandir(path=".", *args):
        raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))

    monkeypatch.setattr(os, "scandir", scandir)
    err = _data_error(load_class_folders, root)
    assert_clean_error(err, root, "cannot list folder (Permission denied)")


# --------------------------------------------------------------------- manifests


def _csv(path, text: str, encoding: str = "utf-8"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode(encoding))
    return path


def test_manifest_paths_groups_and_masks(tmp_path, monkeypatch):
    csv_path = _csv(
        tmp_path / "data" / "manifest.csv",
        "path,label,patient_id,mask\n"
        "img/a.png,Benign,P1,img/a_mask.png\n"
        "img/b.png,malignant,P2,img/b_mask.png; img/b_mask_1.png ;\n"
        "/abs/where/c.png,normal,,\n",
    )
    monkeypatch.chdir(tmp_path)  # relative paths must not depend on the cwd
    r = load_source(csv_path)
    base = (tmp_path / "data").resolve()
    assert r.kind == "csv-manifest"
    assert r.root == str(csv_path)
    assert r.samples == [
        Sample(str(base / "img/a.png"), "benign", "P1", (str(base / "img/a_mask.png"),)),
        Sample(
            str(base / "img/b.png"),
            "malignant",
            "P2",
            (str(base / "img/b_mask.png"), str(base / "img/b_mask_1.png")),
        ),
        Sample("/abs/where/c.png", "normal", None, ()),
    ]
    assert r.bad == []


def test_manifest_relative_csv_path(tmp_path, monkeypatch):
    _csv(tmp_path / "sub" / "m.csv", "path,label\nx.png,benign\n")
    monkeypatch.chdir(tmp_path)
    r = load_source("sub/m.csv")
    assert _paths(r) == [str((tmp_path / "sub" / "x.png").resolve())]


@pytest.mark.parametrize(
    ("header", "row", "group"),
    [
        ("path,label,group", "a.png,benign,G7", "G7"),
        ("path,label,patient_id", "a.png,benign,P9", "P9"),
        ("path,label,group,patient_id", "a.png,benign,G7,P9", "G7"),
        ("path,label", "a.png,benign", None),
        ("path,label,group", "a.png,benign,", None),
    ],
)
def test_manifest_group_columns(tmp_path, header, row, group):
    r = load_manifest(_csv(tmp_path / "m.csv", f"{header}\n{row}\n"))
    assert r.samples[0].group == group


@pytest.mark.parametrize(
    "text",
    [
        "\ufeffpath,label\na.png,benign\n",
        " Path , LABEL \n a.png , Benign \n",
        "path,label\r\na.png,benign\r\n",
        '"path","label"\n"a.png","benign"\n',
    ],
    ids=["bom", "case-and-spaces", "crlf", "quoted"],
)
def test_manifest_header_variants(tmp_path, text):
    path = _csv(tmp_path / "m.csv", text)
    r = load_source(path)
    assert r.samples == [Sample(str(tmp_path.resolve() / "a.png"), "benign", None, ())]


def test_manifest_uppercase_suffix(tmp_path):
    r = load_source(_csv(tmp_path / "M.CSV", "path,label\na.png,benign\n"))
    assert r.kind == "csv-manifest" and len(r.samples) == 1


def test_manifest_bad_rows_are_listed_with_line_numbers(tmp_path):
    csv_path = _csv(
        tmp_path / "m.csv",
        "path,label\n"  # line 1
        "a.png,benign\n"  # 2
        ",benign\n"  # 3
        "b.png,\n"  # 4
        "\n"  # 5: blank, skipped by csv
        "c.png\n"  # 6: too few fields
        "d.png,benign,oops\n"  # 7: more fields than the header
        "e.png,malignant,\n"  # 8: a trailing empty field is harmless
        " , \n",  # 9
    )
    r = load_manifest(csv_path)
    assert _paths(r) == [str(tmp_path.resolve() / "a.png"), str(tmp_path.resolve() / "e.png")]
    assert r.bad == [
        BadFile(f"{csv_path}:3", "row has no path"),
        BadFile(f"{csv_path}:4", "row has no label"),
        BadFile(f"{csv_path}:6", "row has no label"),
        BadFile(f"{csv_path}:7", "row has more fields than the header"),
        BadFile(f"{csv_path}:9", "row has no path"),
    ]
    assert all("\n" not in str(b) for b in r.bad)


def test_manifest_listing_missing_files_keeps_them_for_the_audit(tmp_path):
    r = load_manifest(_csv(tmp_path / "m.csv", "path,label\nghost.png,benign\n"))
    assert _paths(r) == [str(tmp_path.resolve() / "ghost.png")]


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("path,group\na.png,G1\n", "manifest lacks column(s) label; found path, group"),
        ("file,label\na.png,benign\n", "manifest lacks column(s) path; found file, label"),
        ("image;diagnosis\na.png;benign\n", "manifest lacks column(s) path, label"),
        ("", "manifest lacks column(s) path, label; found no header"),
        ("path,label\n,benign\nb.png,\n", "manifest lists no usable rows"),
        ("path,label\n", "manifest lists no usable rows"),
    ],
    ids=["no-label", "no-path", "semicolons", "empty-file", "only-bad-rows", "header-only"],
)
def test_manifest_errors(tmp_path, assert_clean_error, text, fragment):
    path = _csv(tmp_path / "m.csv", text)
    err = _data_error(load_source, path)
    assert_clean_error(err, path, fragment)


def test_manifest_not_utf8(tmp_path, assert_clean_error):
    path = _csv(tmp_path / "m.csv", "path,label\ncafé.png,benign\n", encoding="latin-1")
    err = _data_error(load_source, path)
    assert_clean_error(err, path, "cannot read CSV manifest")


def test_manifest_unreadable(tmp_path, monkeypatch, assert_clean_error):
    import builtins

    path = _csv(tmp_path / "m.csv", "path,label\na.png,benign\n")
    real_open = builtins.open

    def guarded(file, *args, **kwargs):
        if os.fspath(file) == os.fspath(path):
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded)
    err = _data_error(load_source, path)
    assert_clean_error(err, path, "cannot read CSV manifest", "Permission denied")


def test_manifest_is_not_modified(tmp_path):
    path = _csv(tmp_path / "m.csv", "\ufeffpath,label\na.png,benign\n")
    os.utime(path, ns=(10**9, 10**9))
    before = path.read_bytes()
    load_source(path)
    assert path.read_bytes() == before
    assert os.stat(path).st_mtime_ns == 10**9
