"""Hostile datasets (issue 19): bombs and lying headers are refused before anything is allocated, one line each.

The CLI cases run under an address-space limit (`prlimit --as`), so an allocation of what a header declares would
end in a MemoryError traceback instead of the one-line refusal."""
from __future__ import annotations

import io
import os
import pickle
import shutil
import struct
import subprocess
import sys
import tracemalloc
import zipfile

import numpy as np
import numpy.lib.format as npy_format
import pytest

from analyzers.errors import AnalyzerError
from analyzers.loading.datasets import load_dataset, open_dataset, read_npz_bounded
from conftest import ROOT, TinyCNN

ADDRESS_SPACE_LIMIT = 6 << 30  # far below the 8 GiB and 4 TiB the bombs declare, above what a run needs


def npy_header(shape, descr="<f4") -> bytes:
    buffer = io.BytesIO()
    npy_format.write_array_header_1_0(buffer, {"descr": descr, "fortran_order": False, "shape": tuple(shape)})
    return buffer.getvalue()


def npz_with_members(path, members: dict, *, deflate: bool = True):
    """`members`: name -> (header bytes, payload bytes, zero bytes streamed after the payload)."""
    method = zipfile.ZIP_DEFLATED if deflate else zipfile.ZIP_STORED
    with zipfile.ZipFile(path, "w") as archive:
        for name, (header, payload, zeros) in members.items():
            info = zipfile.ZipInfo(name)
            info.compress_type = method
            with archive.open(info, "w", force_zip64=True) as fh:
                fh.write(header + payload)
                block = bytes(1 << 20)
                for _ in range(zeros >> 20):
                    fh.write(block)
    return path


def _labels(n: int) -> tuple:
    y = np.zeros(n, np.int64)
    return npy_header(y.shape, "<i8"), y.tobytes(), 0


def deflate_bomb(path, declared_elements: int, streamed_bytes: int = 64 << 20):
    """x.npy declares `declared_elements` float32s and inflates from a few hundred kB to `streamed_bytes` of zeros."""
    return npz_with_members(path, {"x.npy": (npy_header((declared_elements // 64, 64)), b"", streamed_bytes),
                                   "y.npy": _labels(declared_elements // 64)})


def _cli(tmp_path, data, model="sample:digits"):
    command = [sys.executable, "-m", "analyzers", "run", "--model", model, "--data", str(data),
               "--out", str(tmp_path / "run")]
    if shutil.which("prlimit"):
        command = ["prlimit", f"--as={ADDRESS_SPACE_LIMIT}", "--", *command]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)


def _one_line(done) -> str:
    lines = [line for line in done.stderr.splitlines() if line.strip() and "Warning" not in line
             and "return cls.__new__" not in line]
    assert done.returncode == 1 and len(lines) == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    return lines[0]


def test_an_8_gib_deflate_bomb_is_refused_from_its_header_through_the_cli(tmp_path):
    bomb = deflate_bomb(tmp_path / "bomb.npz", 2 << 30)  # 2^31 float32 = 8 GiB
    assert bomb.stat().st_size < 1 << 20  # under a megabyte on disk
    line = _one_line(_cli(tmp_path, bomb))
    assert line.startswith("error: 'bomb.npz' declares 8,589,934,592 bytes") and "refused before reading" in line
    assert not (tmp_path / "run").exists()


def test_a_header_declaring_4_tib_is_refused_through_the_cli(tmp_path):
    path = npz_with_members(tmp_path / "huge.npz", {"x.npy": (npy_header((1 << 30, 1024), "<f4"), b"", 0),
                                                   "y.npy": _labels(4)}, deflate=False)
    line = _one_line(_cli(tmp_path, path))
    assert "declares 4,398,046,511,104 bytes" in line


def test_the_budget_counts_every_array_together(tmp_path):
    x = np.zeros(150, np.float32)  # 600 bytes each: either fits a 1000-byte budget, both do not
    path = npz_with_members(tmp_path / "two.npz", {"x.npy": (npy_header(x.shape), x.tobytes(), 0),
                                                  "z.npy": (npy_header(x.shape), x.tobytes(), 0)})
    assert read_npz_bounded(str(path), "two.npz", budget=1200)["z"].shape == (150,)
    with pytest.raises(AnalyzerError, match=r"declares 1,200 bytes of arrays \(up to 'z', shape \(150,\)\), over the "
                                            r"1,000-byte limit"):
        read_npz_bounded(str(path), "two.npz", budget=1000)


def test_a_stream_longer_than_its_header_is_never_inflated(tmp_path):
    x = np.arange(400, dtype=np.float32).reshape(100, 4)
    path = npz_with_members(tmp_path / "long.npz", {"x.npy": (npy_header(x.shape), x.tobytes(), 256 << 20),
                                                   "y.npy": _labels(100)})
    tracemalloc.start()
    try:
        arrays = read_npz_bounded(str(path), "long.npz")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    np.testing.assert_array_equal(arrays["x"], x)
    assert peak < 8 << 20  # the 256 MiB tail was never read into memory


def test_a_truncated_member_is_one_line(tmp_path):
    path = npz_with_members(tmp_path / "short.npz", {"x.npy": (npy_header((100, 4)), bytes(100), 0),
                                                    "y.npy": _labels(100)})
    with pytest.raises(AnalyzerError, match=r"'x.npy' in 'short.npz' declares 1,600 bytes but holds 100: the file is "
                                            r"truncated"):
        load_dataset(str(path))


def test_a_raw_pickle_member_is_refused_and_never_unpickled(tmp_path):
    marker = tmp_path / "marker"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = npz_with_members(tmp_path / "pickles.npz", {"x.npy": (b"", pickle.dumps(Payload()), 0),
                                                      "y.npy": (b"", pickle.dumps([1, 2]), 0)})
    with pytest.raises(AnalyzerError) as caught:
        load_dataset(str(path))
    assert "'x.npy' in 'pickles.npz' is not a .npy array" in str(caught.value) and "\n" not in str(caught.value)
    assert not marker.exists()


def test_an_object_array_header_is_refused_before_its_pickle_is_read(tmp_path):
    path = npz_with_members(tmp_path / "objects.npz", {"x.npy": (npy_header((3,), "|O"), pickle.dumps([1, 2, 3]), 0),
                                                      "y.npy": _labels(3)})
    with pytest.raises(AnalyzerError, match="holds Python objects, which are never unpickled"):
        load_dataset(str(path))


def test_a_text_file_named_npz_is_not_said_to_hold_python_objects(tmp_path):
    path = tmp_path / "notes.npz"
    path.write_text("just some text\n")
    with pytest.raises(AnalyzerError, match=r"'notes.npz' is not a readable .npz file \(not a zip archive\)"):
        load_dataset(str(path))


def test_members_that_np_savez_never_writes_are_refused(tmp_path):
    path = tmp_path / "odd.npz"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("x.npy", npy_header((1, 1)) + bytes(4))
        archive.writestr("../y.npy", npy_header((1,), "<i8") + bytes(8))
    with pytest.raises(AnalyzerError, match=r"holds '../y.npy', which is not an array written by np.savez"):
        load_dataset(str(path))


def test_real_npz_files_read_exactly_as_numpy_reads_them(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {"x": rng.random((50, 3, 4, 4), dtype=np.float32), "y": rng.integers(0, 3, 50),
              "ids": np.array([f"s{i}" for i in range(50)]), "class_names": np.array(["a", "b", "c"]),
              "fortran": np.asfortranarray(rng.random((50, 6))), "flags": rng.random(50) > 0.5,
              "empty": np.zeros((0, 3))}
    for save in (np.savez, np.savez_compressed):
        path = tmp_path / f"{save.__name__}.npz"
        save(path, **arrays)
        ours = read_npz_bounded(str(path), path.name)
        with np.load(path) as reference:
            assert sorted(ours) == sorted(reference.files)
            for key in reference.files:
                assert ours[key].dtype == reference[key].dtype and ours[key].shape == reference[key].shape
                np.testing.assert_array_equal(ours[key], reference[key])


def test_a_damaged_byte_in_an_uncompressed_member_fails_its_checksum(tmp_path):
    """np.savez stores members uncompressed, and those are read straight from the file into the array: the
    member's CRC is still checked, as zipfile would, so a flipped bit is one line, not wrong inputs; the same
    bytes from memory (an upload) read through zipfile give zipfile's verdict."""
    x = np.random.default_rng(1).random((64, 3, 8, 8), dtype=np.float32)
    path = tmp_path / "stored.npz"
    np.savez(path, x=x, y=np.arange(64) % 3)
    np.testing.assert_array_equal(load_dataset(str(path)).x, x)
    data = bytearray(path.read_bytes())
    at = data.index(x.tobytes()[:64]) + 1000
    data[at] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(AnalyzerError, match=r"'x.npy' in 'stored.npz' fails its checksum: the file is damaged"):
        load_dataset(str(path))
    with pytest.raises(AnalyzerError, match="damaged"):
        read_npz_bounded(io.BytesIO(bytes(data)), "stored.npz")


def _mapped(array) -> bool:
    """Whether `array` is (a view of) a memory map."""
    while array is not None:
        if isinstance(array, np.memmap):
            return True
        array = getattr(array, "base", None)
    return False


def test_a_new_run_maps_its_npz_and_checks_hash_and_checksum_beside_its_work(tmp_path):
    """open_dataset, as a new run reads its data: an uncompressed member is mapped (not read), its arrays equal
    np.load's, and the hash is load_dataset's once checked(). A flipped bit in the inputs is found by the CRC
    left running in the background: checked() raises what load_dataset raises, and so does the run, after its
    inference and before anything is stored, so that a run already at `out` stays as it was. A file written again
    after it was opened (same size, the mapped pages may hold its new bytes) is refused too."""
    import analyzers

    rng = np.random.default_rng(3)
    x, y = rng.random((64, 1, 8, 8), dtype=np.float32), np.arange(64) % 3
    path = tmp_path / "stored.npz"
    np.savez(path, x=x, y=y, wide=np.asfortranarray(rng.random((64, 5))))
    pending = open_dataset(str(path))
    assert _mapped(pending.dataset.x) and pending.dataset.sha256 == ""
    loaded = load_dataset(str(path))
    assert pending.checked().sha256 == loaded.sha256 and not _mapped(loaded.x)
    for key in ("x", "y"):
        np.testing.assert_array_equal(getattr(pending.checked(), key), getattr(loaded, key))
    np.testing.assert_array_equal(pending.checked().extras["wide"], np.load(path)["wide"])

    model = analyzers.wrap_module(TinyCNN(), (1, 8, 8))
    out = tmp_path / "run"
    analyzers.run_analysis(model, str(path), out, analyses=["evaluation"])
    stored = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    data = bytearray(path.read_bytes())
    data[data.index(x.tobytes()[:64]) + 1000] ^= 0x01
    path.write_bytes(bytes(data))
    damaged = r"'x.npy' in 'stored.npz' fails its checksum: the file is damaged"
    with pytest.raises(AnalyzerError, match=damaged):
        load_dataset(str(path))
    pending = open_dataset(str(path))  # headers and sizes are sound: the damage is in the data
    with pytest.raises(AnalyzerError, match=damaged):
        pending.checked()
    with pytest.raises(AnalyzerError, match=damaged):
        analyzers.run_analysis(model, str(path), out, analyses=["evaluation"], overwrite=True)
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == stored

    fresh = tmp_path / "fresh"  # no run there: refused after inference, before the run is stored
    with pytest.raises(AnalyzerError, match=damaged):
        analyzers.run_analysis(model, str(path), fresh, analyses=["evaluation"])
    assert not fresh.exists()
    # split files and shards are read whole, their CRCs checked as they are read
    shards = tmp_path / "shards"
    shards.mkdir()
    shutil.copy(path, shards / "a.npz")
    np.savez(shards / "b.npz", x=x, y=y)
    for spec in ({"train": str(shards / "b.npz"), "test": str(path)}, str(shards)):
        with pytest.raises(AnalyzerError, match=r"'x.npy' in '(stored|a).npz' fails its checksum: the file is damaged"):
            open_dataset(spec).checked()

    np.savez(path, x=x, y=y, wide=np.asfortranarray(rng.random((64, 5))))
    pending = open_dataset(str(path))
    assert pending.checked().sha256 == load_dataset(str(path)).sha256  # checked once (a run already at `out`)
    data = bytearray(path.read_bytes())
    data[data.index(x.tobytes()[:64]) + 1000] ^= 0x01
    with open(path, "r+b") as fh:  # in place: the same inode and size
        fh.write(bytes(data))
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))  # past the clock's grain
    with pytest.raises(AnalyzerError, match=r"'stored.npz' changed while the run read it: nothing was stored"):
        pending.checked()  # and again before the run is stored: the mapped pages may be the new ones


def test_a_new_run_hashes_a_npy_pair_beside_its_work(tmp_path):
    """open_dataset on a .npy pair: the inputs mapped, the hash (over every member) load_dataset's once checked;
    a label file written again after it was opened is refused."""
    rng = np.random.default_rng(4)
    x, y = rng.random((30, 6), dtype=np.float32), np.arange(30) % 2
    np.save(tmp_path / "part.x.npy", x)
    np.save(tmp_path / "part.y.npy", y)
    spec = str(tmp_path / "part.x.npy")
    pending = open_dataset(spec)
    assert _mapped(pending.dataset.x) and pending.dataset.sha256 == ""
    assert pending.checked().sha256 == load_dataset(spec).sha256
    np.testing.assert_array_equal(pending.checked().x, x)
    pending = open_dataset(spec)
    np.save(tmp_path / "part.y.npy", 1 - y)
    labels = tmp_path / "part.y.npy"
    os.utime(labels, ns=(labels.stat().st_atime_ns, labels.stat().st_mtime_ns + 10**9))  # past the clock's grain
    with pytest.raises(AnalyzerError, match=r"'part.y.npy' changed while the run read it"):
        pending.checked()


def test_a_memory_mapped_npz_reads_as_numpy_and_writes_never_reach_the_file(tmp_path):
    """load_dataset(memory_map=True), as a run's reload uses it: an uncompressed member is mapped copy-on-write,
    a compressed one read as ever; both equal np.load's arrays, and a write into the inputs stays in memory."""
    rng = np.random.default_rng(2)
    x, y = rng.random((40, 3, 8, 8), dtype=np.float32), np.arange(40) % 4
    for save in (np.savez, np.savez_compressed):
        path = tmp_path / f"{save.__name__}.npz"
        save(path, x=x, y=y)
        before = path.read_bytes()
        mapped = load_dataset(str(path), memory_map=True)
        assert mapped.sha256 == load_dataset(str(path)).sha256
        np.testing.assert_array_equal(mapped.x, x)
        np.testing.assert_array_equal(mapped.y, y)
        under, bases = mapped.x, []
        while under is not None:
            bases.append(type(under))
            under = getattr(under, "base", None)
        assert (np.memmap in bases) == (save is np.savez)  # mapped where stored, read where deflated
        mapped.x[0] = -1.0
        assert path.read_bytes() == before


@pytest.mark.parametrize("memory_map", [False, True])
def test_an_uncompressed_member_declaring_more_than_the_file_holds_takes_no_memory(tmp_path, memory_map):
    """A stored member read straight from the file: 1.5 GB declared in its header and the zip directory, 64 bytes
    held. It is refused as truncated before its array is allocated (a populated mapping would have taken the
    1.5 GB at once), and a memory map never reaches past the end of the file (numpy's raw ValueError)."""
    path = tmp_path / "short-stored.npz"
    npz_with_members(path, {"x.npy": (npy_header((3 << 27,)), bytes(64), 0), "y.npy": _labels(4)}, deflate=False)
    data = bytearray(path.read_bytes())
    entry = data.index(b"PK\x01\x02")  # the x member's central entry: its sizes say 1.5 GB too
    declared = len(npy_header((3 << 27,))) + (3 << 29)
    data[entry + 20:entry + 28] = struct.pack("<II", declared, declared)
    extra = entry + 46 + len("x.npy")  # the zip64 extra field (force_zip64) holds the sizes as well
    if data[extra:extra + 2] == b"\x01\x00":
        data[extra + 4:extra + 20] = struct.pack("<QQ", declared, declared)
    path.write_bytes(bytes(data))
    code = ("import resource, sys; from analyzers.loading.datasets import read_npz_bounded; "
            "from analyzers.errors import AnalyzerError\n"
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            f"try:\n    read_npz_bounded({str(path)!r}, 'short-stored.npz', memory_map={memory_map})\n"
            "except AnalyzerError as exc:\n    print('refused:', exc)\n"
            "print('grew_kib', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert "ends after" in out.stdout and "the file is truncated" in out.stdout, out.stdout + out.stderr
    assert int(out.stdout.split("grew_kib")[1]) < 100 << 10, out.stdout  # under 100 MiB, not 1.5 GB


def test_a_npy_header_cut_inside_its_dict_is_one_line():
    """numpy's header parser raised tokenize's TokenError (not a ValueError) on an unclosed bracket."""
    body = b"{'descr': '<f4', 'fortran_order': False, 'shape': (3,"
    body += b" " * (118 - len(body)) + b"\n"
    member = b"\x93NUMPY\x01\x00" + struct.pack("<H", len(body)) + body
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("x.npy", member)
    with pytest.raises(AnalyzerError, match=r"'x.npy' in 'cut.npz' is not a .npy array"):
        read_npz_bounded(io.BytesIO(archive.getvalue()), "cut.npz")


def test_ragged_csv_rows_and_huge_floats_get_messages_that_say_so(tmp_path):
    ragged = tmp_path / "ragged.csv"
    ragged.write_text("a,b,label\n1,2,0\n3,4\n5,6,1\n")
    with pytest.raises(AnalyzerError, match=r"1 labels in 'ragged.csv' are missing or not finite, the first in row 1"):
        load_dataset(str(ragged))
    huge = tmp_path / "huge.csv"
    huge.write_text("a,b,label\n1,2,0\n1e300,4,1\n")
    with pytest.raises(AnalyzerError, match=r"beyond float32's range .* the first in row 1: rescale them"):
        load_dataset(str(huge))

