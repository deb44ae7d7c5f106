"""The shape of the house (issue 12): a flat import graph, algorithm-only imports between scripts,
files a reader can hold in their head, and a repository that cites its own documents."""
import ast
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GROUND = {"data", "task", "fsdp_utils", "train_utils", "checkpoint"}  # the ground floor: plumbing and the built-in task
ALGORITHM_FROM_DVPO = {"BATCH_KEYS", "gae", "kl_controller", "masked_batch_norm", "masked_mean", "ppo_clip_loss",
                       "terminal", "discounted_cumsum", "td_advantages"}  # what ppo_baseline.py may reuse


def top_level() -> dict:
    """module name -> parsed source of every top-level .py file."""
    return {f[:-3]: ast.parse(open(os.path.join(ROOT, f)).read()) for f in os.listdir(ROOT) if f.endswith(".py")}


def imports(tree: ast.Module, ours: set) -> set:
    found = set()
    for n in ast.walk(tree):
        if isinstance(n, ast.Import):
            found |= {a.name.split(".")[0] for a in n.names}
        elif isinstance(n, ast.ImportFrom) and n.module:
            found.add(n.module.split(".")[0])
    return found & ours


def test_at_most_four_floors():
    mods = top_level()
    deps = {m: imports(t, set(mods)) for m, t in mods.items()}

    def floor(m):  # the ground floor's rooms are one floor; every other file sits above what it imports
        return 1 if m in GROUND else 1 + max((floor(d) for d in deps[m]), default=0)

    floors = {m: floor(m) for m in mods}
    assert max(floors.values()) <= 4, floors
    assert floors["bench"] == max(floors.values())  # bench.py on top
    assert all(deps[g] <= GROUND for g in GROUND), deps  # the ground floor imports no script


def test_scripts_import_only_algorithm_from_dvpo():
    for name, tree in top_level().items():
        for n in ast.walk(tree):
            if isinstance(n, ast.ImportFrom) and n.module == "dvpo":
                names = {a.name for a in n.names}
                assert names <= ALGORITHM_FROM_DVPO, (name, names - ALGORITHM_FROM_DVPO)


def test_file_and_line_lengths():
    for f in sorted(os.listdir(ROOT)):
        if f.endswith(".py"):
            lines = open(os.path.join(ROOT, f)).read().splitlines()
            assert len(lines) <= (380 if f == "bench.py" else 450), (f, len(lines))
            long = [i + 1 for i, line in enumerate(lines) if len(line) > 120]
            assert not long, (f, long)


def test_imports_at_the_top():
    """In-function imports only for optional dependencies, marked as such in a comment."""
    for name, tree in top_level().items():
        src = open(os.path.join(ROOT, name + ".py")).read().splitlines()
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for n in ast.walk(fn):
                    if isinstance(n, (ast.Import, ast.ImportFrom)):
                        assert "optional" in src[n.lineno - 1], f"{name}.py:{n.lineno}: import inside {fn.name}()"


def test_cites_its_own_documents():
    cited, spec = set(), "DESIGN" + ".md"  # the spec this project was built from is not in the repository
    for dirpath, _, files in os.walk(ROOT):
        if ".git" in dirpath or "out" in dirpath.split(os.sep):
            continue
        for f in files:
            if f.endswith((".py", ".md", ".sh")):
                text = open(os.path.join(dirpath, f), errors="ignore").read()
                assert spec not in text, os.path.join(dirpath, f)
                cited |= set(re.findall(r"docs/algorithm\.md §(\d+)", text))
    sections = set(re.findall(r"^## (\d+)\. ", open(os.path.join(ROOT, "docs", "algorithm.md")).read(), re.M))
    assert cited and cited <= sections, cited - sections  # every cited section exists
