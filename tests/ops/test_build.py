"""The build machinery: one process builds under the file lock while the others wait and reuse its
result; the cache key follows the sources; a stale prebuilt library is recognised without loading."""
import subprocess
import sys
import textwrap
from pathlib import Path

from forge_dist.ops import builder

ROOT = Path(__file__).resolve().parents[2]

WORKER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from forge_dist.ops import builder

    build_dir, who = Path(sys.argv[1]), sys.argv[2]

    def build(d):  # stands in for the compiler: slow, and leaves a record of who ran it
        with open(d / "builders.txt", "a") as f:
            f.write(who + "\\n")
        time.sleep(2.0)
        lib = d / "lib.so"
        lib.write_text("built by " + who)
        return lib

    path = builder.build_once(build_dir, build, log=lambda m: print(who, m, flush=True))
    print(who, "GOT", path.read_text(), flush=True)
""")


def test_two_processes_one_build(tmp_path):
    build_dir = tmp_path / "key"
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(build_dir), name], cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for name in ("rank0", "rank1")]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    builders = (build_dir / "builders.txt").read_text().split()
    assert len(builders) == 1, builders  # exactly one compiled
    stdout = "".join(o[0] for o in outs)
    waiter = "rank1" if builders[0] == "rank0" else "rank0"
    assert f"{waiter} forge_ops: another process is building" in stdout
    assert stdout.count(f"GOT built by {builders[0]}") == 2  # both load the one result
    # a later process finds the recorded build without taking the lock's slow path
    again = subprocess.run([sys.executable, "-c", WORKER, str(build_dir), "rank2"], cwd=ROOT, text=True,
                           capture_output=True, timeout=60)
    assert again.returncode == 0 and f"GOT built by {builders[0]}" in again.stdout
    assert (build_dir / "builders.txt").read_text().split() == builders


def test_key_changes_with_sources(tmp_path, monkeypatch):
    key = builder.build_key(False)
    assert len(key) == 16 and key == builder.build_key(False)
    assert builder.build_key(False, jit=False) != key  # portable prebuilt vs -march=native JIT
    csrc = tmp_path / "csrc"
    for p in builder.sources(False) + builder._headers():
        dest = csrc / p.relative_to(builder.CSRC)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(p.read_bytes())
    monkeypatch.setattr(builder, "CSRC", csrc)
    assert builder.build_key(False) == key
    (csrc / "cpu" / "norms.cpp").write_text((csrc / "cpu" / "norms.cpp").read_text() + "\n// edited\n")
    assert builder.build_key(False) != key


def test_library_key_is_read_from_the_bytes(tmp_path):
    lib = tmp_path / "fake.so"
    lib.write_bytes(b"\x7fELF....FORGE_OPS_KEY:0123abcd4567ef89;....")
    assert builder.library_key(lib) == "0123abcd4567ef89"
    lib.write_bytes(b"\x7fELF no marker")
    assert builder.library_key(lib) is None


def test_loaded_library_reports_its_key():
    from forge_dist.ops import registry
    import torch

    state = registry.ensure_loaded()
    assert builder.library_key(Path(state.path)) == torch.ops.forge_ops.build_info()


def test_prebuilt_library_accepted_only_for_these_sources(tmp_path, monkeypatch):
    """find_prebuilt reads the key compiled into the installed library (without loading it): the
    portable key of the current sources and torch is accepted, any other is reported stale."""
    import importlib.util
    from types import SimpleNamespace

    lib = tmp_path / "_forge_ops.so"
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name: SimpleNamespace(origin=str(lib)) if name == builder.PREBUILT_MODULE else None)
    lib.write_bytes(b"ELF FORGE_OPS_KEY:" + builder.build_key(False, jit=False).encode() + b"; more")
    assert builder.find_prebuilt() == (lib, "")
    lib.write_bytes(b"ELF FORGE_OPS_KEY:0000000000000000; more")
    path, why = builder.find_prebuilt()
    assert path is None and "stale" in why
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert builder.find_prebuilt()[0] is None
